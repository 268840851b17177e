"""The on-device half of edgetl. Never imports torch, torchvision, timm or nncf."""
