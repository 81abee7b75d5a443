"""Vectors from thumbnails: model settings and weights (model_settings, no torch), the backbone table and one module per family (backbones/: specs and checkpoint_dir without torch, then resnet, vit, clip), models ready for inference (models), a CLIP's text tower (text_encoder), decode backends (thumbnail_decoders), inference (inference), a partition's rows with reuse and staging (partition, staging), progress lines (progress), drift statistics (drift), CPU malloc tuning (allocator).

May import storage, imaging, quality and lake. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
