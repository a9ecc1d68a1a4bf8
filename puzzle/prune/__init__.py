"""Minitron pruning: width (hidden size, FFN neurons, attention heads) and depth (whole layers), then KD.

Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"; Sreenivas et al.
2024, "LLM Pruning and Distillation in Practice" ; docs/methods.md, "Minitron pruning".

    from puzzle.prune import PruneConfig, minitron_kd, prune
    data = DataConfig(paths=("corpus/",))
    prune("parent/", "child/", PruneConfig(hidden_size=3072, ffn_size=9216, data=data, distill=minitron_kd(10**8)))

The baselines the benchmarks compare against are settings of this one entry:
    ShortGPT (Men et al. 2024)   PruneConfig(drop_layers=n, metric="cos")                      no retraining
    Minitron depth               PruneConfig(drop_layers=n, contiguous=True, distill=minitron_kd(t))
    Minitron width (uniform)     PruneConfig(hidden_size=c, ffn_size=i[, heads=h], distill=minitron_kd(t))
    Minitron MoE (experts)       PruneConfig(experts=k, expert_ffn_size=i[, hidden_size=c], distill=minitron_kd(t))
and on the command line `puzzle prune CKPT OUT --drop-layers N` (ShortGPT) or
`--hidden-size C --ffn-size I --distill-tokens T` (Minitron width; `--experts K --expert-ffn-size I` on
mixture-of-experts parents).

Modules: config.py (PruneConfig, PruneResult), importance.py (activation and block importance),
plan.py (targets + importance -> which indices stay), slicing.py (the plan applied to the weights),
export.py (plain LlamaForCausalLM output), stage.py (`prune`).
"""

from puzzle.prune.config import PruneConfig, PruneResult, ShapeSummary, minitron_kd
from puzzle.prune.stage import prune

__all__ = ["PruneConfig", "PruneResult", "ShapeSummary", "minitron_kd", "prune"]
