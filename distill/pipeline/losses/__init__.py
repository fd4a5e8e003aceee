"""Stage 2's loss terms as pure tensor functions (shapes in each docstring, fp32 reductions, explicit masks).

The default objective: kd (``kd_mode=prefix``, prefix_kd.py, computed with lm in the output-layer pass of
fused_head.py), lm (fused_head.py) and the representation terms (representation.py, against the targets of
hidden_targets.py), weighed into one total by combine.py. The other kd modes: kd.py (tail, ULD, projector),
sampled_kd.py (sampled targets), cross_tokenizer.py (ALM). Which term runs when: pipeline/train/terms.py.
"""
