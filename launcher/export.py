"""`python -m launcher.export run.dir=<run> export.output=<dir>` (or `export.checkpoint=<path>`):
a checkpoint of any layout -> a Hugging Face directory that `from_pretrained` loads."""

from pathlib import Path

from omegaconf import DictConfig

from launcher.common import hydra_main
from megatrain.config import ConfigError, to_config


def _export(cfg: DictConfig) -> None:
    from megatrain.engine.checkpoint import Checkpointer
    from megatrain.export.hf import export_checkpoint

    c = to_config(cfg)
    if c.export.checkpoint:
        checkpoint = Path(c.export.checkpoint)
        if not checkpoint.is_dir():
            raise ConfigError(f"export.checkpoint={checkpoint}: no such checkpoint directory")
    else:
        checkpoint = Checkpointer(Path(c.run.dir), keep_last=0, rank=0).find_latest(with_portable=True)
        if checkpoint is None:
            raise ConfigError(f"run.dir={c.run.dir} holds no complete checkpoint with a portable copy; "
                              "give export.checkpoint=<path>")
    output = Path(c.export.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not c.export.overwrite:
        raise ConfigError(f"export.output={output} exists and is not empty: refusing to overwrite its files; "
                          "choose a new directory or pass export.overwrite=true")
    try:
        arch = export_checkpoint(checkpoint, output, c.export.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(f"exported {checkpoint} as {arch} to {c.export.output}", flush=True)


main = hydra_main(_export)

if __name__ == "__main__":
    main()
