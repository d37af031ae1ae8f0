"""SAM-refined pseudo-labels (Keuth et al. 2024): prompts from coarse masks, a batched SAM
refiner, and the pseudo-label store. Pure torch/numpy; the Ray Data pipeline that drives them
lives in semiseg.distributed.pseudolabel.

Call `semiseg.sam.compat.ensure_sam_imports()` before importing segment_anything or mobile_sam
yourself; everything in this package does it for you.
"""
