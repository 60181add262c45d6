"""Run by tests/train/test_distributed.py under ``accelerate launch``: ``tropd train``, but the sampler of process
1 hands back a NaN behaviour log-prob at the second step, so that process alone refuses a micro-batch.

    accelerate launch ... tests/train/refuse_on_one_process.py CONFIG [OVERRIDES...]
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from tropd.rollout.sampler import KVCacheSampler
from tropd.train.config import load_config
from tropd.train.run import train_from_config


class NaNOnProcess1(KVCacheSampler):
    def sample(self, prompts, request):
        batch = super().sample(prompts, request)
        if request.global_step == 1 and dist.get_rank() == 1:
            batch.behavior_logprobs[0, 0] = float("nan")
        return batch


if __name__ == "__main__":
    train_from_config(load_config(sys.argv[1], sys.argv[2:]), console=lambda *_: None, make_sampler=NaNOnProcess1)
