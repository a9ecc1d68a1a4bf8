"""FFN Fusion: a run of sequential FFNs replaced by one wide FFN on their shared input.

Bercovich et al., "FFN Fusion: Rethinking Sequential Computation in Large Language Models" (2025);
docs/methods.md, "FFN Fusion". Once attention is gone from some layers,
their FFNs follow each other with nothing in between:

    h_1 = x,  h_{j+1} = h_j + f_j(h_j)          sequential: what the model computes
    y   = x + sum_j f_j(x)                      parallel:   what the fused model computes

with f_j(h) = down_j(act(gate_j(g_j * n(h))) * up_j(g_j * n(h))) and n the RMSNorm without its gain g_j.
The parallel form is one FFN of width sum_j I_j: each g_j folded into the columns of gate_j / up_j, gate
and up concatenated along the intermediate axis, down along its input axis, down biases summed, and a
unit-gain norm in front. The fused FFN sits in the first layer of its group (which keeps its attention, if
it has one); the group's other layers become fully no-op. The result is the same checkpoint format, and
vLLM-native whenever the input was.

A *run* is a maximal chain of gated FFNs with no attention between them: an FFN and the FFNs of the
following layers whose attention is no-op. Note that the chain starts at the FFN of the layer *before*
the first attention-free layer: nothing separates the two, so they too can read the same input. Which
FFNs to fuse is decided on calibration tokens by the dependency of f_j on its predecessors, the cosine
distance between f_j's output on its true (sequential) input and on the group's input; a group grows
while that is <= `threshold` and it has fewer than `max_run` members. The last FFN of each run stays
separate by default (the paper: it helps quality).

    report = fuse_ffn("children/2x", "children/2x-fused", FusionConfig(data=DataConfig(paths=("corpus",))))
    report = fuse_ffn("children/2x", None, FusionConfig(threshold=None))      # dry run, no calibration

Modules: config.py (FusionConfig and the report), runs.py (runs, groups, fused architecture, cost model),
weights.py (the fused weights), stage.py (`fuse_ffn`).
"""

from puzzle.fusion.config import FUSION_VERSION, FusionConfig, FusionQuality, FusionReport, RunPlan
from puzzle.fusion.runs import DecodeCostModel, choose_groups, ffn_depth, find_runs, fused_architecture
from puzzle.fusion.stage import compare_to_reference, final_hidden, fuse_ffn, measure_dependency
from puzzle.fusion.weights import FFNWeights, fuse_ffn_weights, fuse_layers_, layer_ffn_weights

__all__ = ["FUSION_VERSION", "DecodeCostModel", "FFNWeights", "FusionConfig", "FusionQuality", "FusionReport", "RunPlan",
           "choose_groups", "compare_to_reference", "ffn_depth", "final_hidden", "find_runs", "fuse_ffn",
           "fuse_ffn_weights", "fuse_layers_", "fused_architecture", "layer_ffn_weights", "measure_dependency"]
