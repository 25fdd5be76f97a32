"""`vtprune`: the LightningCLI over `PrunedMLLM` and any `BenchmarkDataModule`.

    vtprune validate -c configs/experiment/demo.yaml
    vtprune validate -c configs/experiment/demo.yaml --model.pruner=fastv --model.pruner.budget=64

`--model.pruner=NAME` takes a pruner registry name (see `pruner_names`); later `-c` files override
earlier ones; YAML files may use OmegaConf interpolation, resolved once over all files and the command
line (`--trainer.default_root_dir=DIR` moves the log and checkpoint folders derived from it).

`vtprune fit` trains any LightningModule, named by `model.class_path` in its config:

    vtprune fit -c configs/experiment/train_tiny_llava_vision.yaml   # VisionPretraining
    vtprune fit -c configs/experiment/train_tiny_llava_grounded.yaml # GroundedPretraining
    vtprune fit -c configs/experiment/train_tiny_llava_align.yaml    # ProjectorAlignment
    vtprune fit -c configs/experiment/train_tiny_llava.yaml          # QAFinetuning
    vtprune fit -c configs/experiment/train_dyvte.yaml               # DyVTETraining (DyVTE's exit routers)
    vtprune fit -c configs/experiment/train_gate.yaml                # LearnedPrunerTraining (the learned gate)
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import set_parsing_settings
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from . import pruner_names

# Imported so that configs can name these classes without their module path.
from .datamodule import BenchmarkDataModule, JsonlBenchmark  # noqa: F401
from .dyvte_training import DyVTETraining  # noqa: F401
from .grounded_pretraining import GroundedPretraining  # noqa: F401
from .learned_training import LearnedPrunerTraining  # noqa: F401
from .module import PrunedMLLM
from .projector_alignment import ProjectorAlignment  # noqa: F401
from .qa_finetuning import QAFinetuning  # noqa: F401
from .shapes_data import ShapesBenchmark  # noqa: F401
from .vision_pretraining import VisionPretraining  # noqa: F401

RICH_BAR = "pytorch_lightning.callbacks.RichProgressBar"
# "omegaconf+" resolves interpolation once, over the merged config files and command line, so that
# `--trainer.default_root_dir=DIR` also moves every path a config derives from it (logger, checkpoints,
# output folder). Configs write absolute paths (`${trainer.default_root_dir}`), which this setting reads
# relative to the subcommand (fit, validate) they sit under.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class VtpruneParser(LightningArgumentParser):
    """Adds the list of pruners and their arguments to any parse error about the pruner."""

    def _load_config_parser_mode(self, content: str, *args, **kwargs):
        # Config files may name hyphenated pruners ("ficoco-v"); see pruner_names.
        return super()._load_config_parser_mode(pruner_names.normalize_config_text(content), *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if "pruner" in message:
            message = f"{message}\n{pruner_names.describe()}"
        super().error(message, ex)


class VtpruneCLI(LightningCLI):
    def instantiate_classes(self) -> None:
        # A budget that does not fit the model, or a missing model folder, is a configuration
        # error: report it like a parse error (usage + message, exit 2), not as a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err), err)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.callbacks": [{"class_path": RICH_BAR}]})

    def before_instantiate_classes(self) -> None:
        # The rich bar is a default, so switching the bar off must drop it (Lightning refuses both).
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if trainer.enable_progress_bar is False and trainer.callbacks:
            trainer.callbacks = [c for c in trainer.callbacks if c.class_path != RICH_BAR]


def main(args: ArgsType = None) -> None:
    """Entry point of the `vtprune` console script; `args` replaces sys.argv[1:] (for tests)."""
    pruner_names.define_aliases()  # cover pruners registered after this package was imported
    args = pruner_names.normalize_argv(sys.argv[1:] if args is None else list(args))
    # fit trains whatever module its config names; validate and test evaluate a PrunedMLLM.
    fit = bool(args) and args[0] == "fit"
    # LightningCLI warns when given args while sys.argv holds some: ours are sys.argv's, normalized.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    VtpruneCLI(
        None if fit else PrunedMLLM,
        BenchmarkDataModule,
        subclass_mode_model=fit,
        subclass_mode_data=True,
        parser_class=VtpruneParser,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
