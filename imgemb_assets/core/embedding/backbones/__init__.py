"""Backbones by family, one file each, the model returned with its preprocessing (timm's `models/`, open_clip's `create_model_and_transforms`): the torch-free table of what each name is (specs), open_clip checkpoint folders read without torch (checkpoint_dir), the interface a family implements (family), torchvision's weights (torchvision_weights), ResNets (resnet), ViTs (vit), open_clip's CLIPs with their text towers (clip).

Keep this file free of imports: the Dagster resources import `specs` without torch.
"""
