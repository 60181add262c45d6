"""Test-session settings: tiny models run fastest single-threaded (no thread oversubscription on 2 cores)."""

import torch

torch.set_num_threads(1)
