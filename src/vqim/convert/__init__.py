"""`vqim convert`: public checkpoints of other implementations → vqim model folders.

One small module per source maps its configuration and weights onto vqim's models (never a copy of the source's
model code); `convert()` writes `config.json` + `model.safetensors`, which `Tokenizer.from_pretrained` reads, so
every vqim tool (encode, reconstruct, eval-tokenizer, train-prior, sample) works on the converted model.
Checkpoints are read without running code from them (`vqim.convert.safe_pickle`).

Sources: `taming` (taming-transformers' VQGAN tokenizers and class-conditional or unconditional GPTs,
`vqim.convert.taming`), `llamagen` (LlamaGen's VQ tokenizers, `vqim.convert.llamagen`) and `enhancing`
(enhancing-transformers' ViT-VQGAN tokenizers, `vqim.convert.enhancing`). LlamaGen's GPT and
enhancing-transformers' GPTs are not converted yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vqim.errors import InputError, check_output


@dataclass(kw_only=True)
class ConvertConfig:
    """What `vqim convert` does.

    Args:
        source: the implementation that wrote the checkpoint: taming (taming-transformers' VQGAN), llamagen
            (LlamaGen's VQ tokenizer) or enhancing (enhancing-transformers' ViT-VQGAN).
        checkpoint: the checkpoint file (.ckpt / .pt / .pth, read without running code from it; or .safetensors).
        config: the model's YAML config (taming: the configs/*.yaml or project.yaml released with it; enhancing:
            its configs/imagenet_vitvq_*.yaml; llamagen: none, the architecture is read off the weights).
        image_size: llamagen: the image side the tokenizer was trained at (256 or 384).
        tokenizer: taming transformer without its first stage in the checkpoint: the vqim folder of that first
            stage (converted before), recorded in the prior's tokens.json so that sample/eval-prior accept the pair.
        out: folder for the vqim model (config.json + model.safetensors); for a taming transformer, OUT/prior and
            (when the checkpoint holds its first stage) OUT/tokenizer.
    """

    source: Literal["taming", "llamagen", "enhancing"]
    checkpoint: str
    config: str | None = None
    image_size: int = 256
    tokenizer: str | None = None
    out: str

    def __post_init__(self) -> None:
        check_output(self.out)


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"--config {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {p}: expected a mapping at the top level")
    return data


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert cfg.checkpoint; returns what was written (and the model's parameter counts)."""
    from vqim.checkpoint import load_weights
    from vqim.convert.safe_pickle import load_checkpoint, state_dict_of
    from vqim.tokenizer import Tokenizer

    if cfg.source in ("taming", "enhancing") and cfg.config is None:
        raise InputError(
            f"--config is needed for --source {cfg.source}: the YAML released with the checkpoint"
        )
    if Path(cfg.checkpoint).suffix == ".safetensors":
        sd = load_weights(cfg.checkpoint, "--checkpoint")
    else:
        sd = state_dict_of(load_checkpoint(cfg.checkpoint), cfg.checkpoint)
    if cfg.source == "taming":
        from vqim.convert import taming

        yaml_cfg = _read_yaml(cfg.config)
        if taming.is_transformer(yaml_cfg):
            return _convert_taming_prior(cfg, yaml_cfg, sd)
        tcfg = taming.tokenizer_config(yaml_cfg, cfg.config)
        state = taming.tokenizer_state(sd, tcfg, cfg.checkpoint)
    elif cfg.source == "enhancing":
        from vqim.convert import enhancing

        tcfg = enhancing.tokenizer_config(_read_yaml(cfg.config), sd, cfg.config)
        state = enhancing.tokenizer_state(sd, tcfg, cfg.checkpoint)
    else:
        from vqim.convert import llamagen

        tcfg = llamagen.tokenizer_config(sd, cfg.image_size, cfg.checkpoint)
        state = llamagen.tokenizer_state(sd, tcfg, cfg.checkpoint)
    given = f"--config {cfg.config}" if cfg.config else "the architecture read off the weights"
    model = Tokenizer.build_checked(
        tcfg, state, cfg.out, source=f"{cfg.checkpoint}: the weights do not fit the model {given} describes"
    )
    model.load_state_dict(state)
    model.save_pretrained(cfg.out)
    return {"out": cfg.out, "source": cfg.source, "kind": "tokenizer", "params": model.num_params(),
            "config": tcfg.to_dict(arch_only=True)}  # fmt: skip


def _convert_taming_prior(cfg: ConvertConfig, yaml_cfg: dict[str, Any], sd: dict) -> dict[str, Any]:
    """A taming Net2NetTransformer → OUT/prior (and OUT/tokenizer from its first stage when the checkpoint has it)."""
    from vqim.checkpoint import write_json
    from vqim.convert import taming
    from vqim.prior import Prior
    from vqim.tokenizer import Tokenizer
    from vqim.tokens import tokenizer_identity

    pcfg, first, sos = taming.prior_config(yaml_cfg, cfg.config)
    state = taming.prior_state(sd, pcfg, sos, cfg.checkpoint)
    out = Path(cfg.out)
    misfit = f"{cfg.checkpoint}: the weights do not fit the model --config {cfg.config} describes"
    prior = Prior.build_checked(pcfg, state, out / "prior", source=misfit)
    prior.load_state_dict(state)
    prior.save_pretrained(out / "prior")
    result: dict[str, Any] = {"out": str(out), "source": cfg.source, "kind": "prior", "prior": str(out / "prior"),
                              "params": prior.num_params(), "config": pcfg.to_dict()}  # fmt: skip
    tok = None
    first_sd = {
        k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    if first_sd:
        tstate = taming.tokenizer_state(first_sd, first, cfg.checkpoint)
        tok = Tokenizer.build_checked(first, tstate, out / "tokenizer", source=misfit)
        tok.load_state_dict(tstate)
        tok.save_pretrained(out / "tokenizer")
        result["tokenizer"] = str(out / "tokenizer")
    elif cfg.tokenizer is not None:
        tok = Tokenizer.from_pretrained(cfg.tokenizer)
        if tok.config.codebook_size != pcfg.vocab_size or tuple(tok.grid_size) != tuple(pcfg.grid_size):
            raise InputError(
                f"--tokenizer {cfg.tokenizer} ({tok.config.codebook_size} codes, grid {tuple(tok.grid_size)}) is not "
                f"the first stage of this transformer ({pcfg.vocab_size} codes, grid {tuple(pcfg.grid_size)})"
            )
        result["tokenizer"] = cfg.tokenizer
    if tok is not None:  # what train-prior records: the tokens the prior reads come from this tokenizer
        write_json(out / "prior" / "tokens.json", {"tokens": None, **tokenizer_identity(tok),
                                                   "grid_size": list(pcfg.grid_size), "codebook_size": pcfg.vocab_size,
                                                   "class_names": None, "condition": None})  # fmt: skip
    return result


__all__ = ["ConvertConfig", "convert"]
