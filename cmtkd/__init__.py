"""cmtkd: Collaborative Multi-Teacher Knowledge Distillation for low bit-width DNNs (WACV 2023)."""
__version__ = "0.1.0"
