"""Helper launched by test_distributed.py: train, then every process saves its own weights."""

import sys

from vqim.checkpoint import save_tensors
from vqim.distributed import leave
from vqim.train.tokenizer import TokenizerTrainConfig, train_tokenizer

if __name__ == "__main__":
    out, data = sys.argv[1], sys.argv[2]
    cfg = TokenizerTrainConfig(
        out=out, data=data, preset="vit-vqgan-tiny", steps=4, batch_size=8, lr=1e-3, num_workers=0,
        model={"image_size": 32, "dead_code_window": 2}, ckpt_every=100, image_every=100, progress=False,
    )  # fmt: skip

    def save_own(model, acc):
        save_tensors(f"{out}/rank{acc.process_index}.safetensors", model.state_dict())

    train_tokenizer(cfg, on_end=save_own)
    leave(0)
