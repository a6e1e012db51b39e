"""dkgm_aug: generative oversampling for imbalanced image classification with DKGM."""
__version__ = "0.1.0"

from .balanced import BalancedDKGMDataset
from .bank import NeighbourBank
from .bank_augment import BankAugment
from .checkpoint import list_pretrained, load, save
from .dkgm import DKGM
from .errors import CheckpointError, DataError, DKGMError
from .metrics import sharpness
from .trainer import Trainer
from .transforms import DKGMAugment
from .kss import KernelSmoothedScore
from .label_filter import LabelFilter, list_evaluators
from .vae import EVAE, VAE
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["DKGM", "EVAE", "VAE", "KernelSmoothedScore", "Trainer", "DKGMAugment", "BalancedDKGMDataset", "NeighbourBank", "BankAugment", "LabelFilter", "list_evaluators", "UNet", "UNetConfig", "PRESETS", "load", "save", "list_pretrained",
           "sharpness", "DKGMError", "CheckpointError", "DataError", "__version__"]
