"""The two training stages of the tiny LLaVA: they learn, freeze what LLaVA freezes, and export
folders that `from_pretrained` loads."""

import pytest
import pytorch_lightning as pl
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lightning_modules.qa_finetuning import QAFinetuning
from lightning_modules.shapes_data import ShapesBenchmark
from lightning_modules.vision_pretraining import VisionPretraining


def trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 overfitting one batch of 4 scenes for 12 steps; returns (module, batch, loss before)."""
    out = tmp_path_factory.mktemp("vision")
    pl.seed_everything(0)
    module = VisionPretraining(output_dir=str(out), lr=2e-3, warmup_steps=1)
    data = ShapesBenchmark(train_size=4, batch_size=4, fit_val_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = sum(module.losses(module.pixels(batch["image"]), batch["targets"]).values())
    trainer(12).fit(module, datamodule=data)
    return module, batch, before


def test_vision_pretraining_learns_through_cls(stage1):
    module, batch, before = stage1
    with torch.no_grad():
        after = sum(module.losses(module.pixels(batch["image"]), batch["targets"]).values())
    assert after < 0.7 * before


def test_vision_export_loads_with_the_trained_tower(stage1):
    module, _, _ = stage1
    folder = module.hparams.output_dir
    loaded = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    AutoProcessor.from_pretrained(folder, local_files_only=True)
    trained = module.llava.model.vision_tower.state_dict()
    for name, value in loaded.model.vision_tower.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_qa_finetuning_freezes_the_tower_and_trains_the_rest(stage1, tmp_path):
    vision_dir = stage1[0].hparams.output_dir
    module = QAFinetuning(model_name_or_path=vision_dir, output_dir=str(tmp_path), warmup_steps=1)
    tower = {k: v.clone() for k, v in module.llava.model.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in module.llava.model.multi_modal_projector.state_dict().items()}
    trainer(2).fit(module, datamodule=ShapesBenchmark(train_size=4, batch_size=2, fit_val_size=2, turns=3))
    assert all(torch.equal(v, tower[k]) for k, v in module.llava.model.vision_tower.state_dict().items())
    trained = module.llava.model.multi_modal_projector.state_dict()
    assert not all(torch.equal(v, projector[k]) for k, v in trained.items())
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    assert torch.equal(loaded.lm_head.weight, module.llava.lm_head.weight)


def test_qa_loss_is_on_every_answer_and_its_end_token(stage1, tmp_path):
    module = QAFinetuning(model_name_or_path=stage1[0].hparams.output_dir, output_dir=str(tmp_path))
    prefix, turns = module.conversation([("what color is the star ?", "red"), ("is there a red star ?", "yes")])
    assert prefix == "USER: <image>\n" and turns == ["what color is the star ? ASSISTANT: red</s>",
                                                      "is there a red star ? ASSISTANT: yes</s>"]  # fmt: skip
    tokenizer = module.processor.tokenizer
    ids = tokenizer([prefix + "".join(turns)], return_tensors="pt")["input_ids"]
    marked = tokenizer.convert_ids_to_tokens(ids[0][module.answer_mask(ids)[0]])
    assert marked == ["red", "</s>", "yes", "</s>"]


def test_packed_turns_are_scored_as_their_single_turn_prompts(stage1, tmp_path):
    """The logits at each turn's answer equal those of that question asked alone, as evaluation asks it."""
    from data.shapes import make_sample

    module = QAFinetuning(model_name_or_path=stage1[0].hparams.output_dir, output_dir=str(tmp_path)).eval()
    picture = make_sample(0, "val", 0).image()
    qas = [("what color is the star ?", "red"), ("is there a red star ?", "yes")]
    qas.append(("how many stars are there ?", "one"))
    inputs = module.training_inputs({"image": [picture], "turns": [qas]})
    ids = inputs["input_ids"][0]
    eos = module.processor.tokenizer.eos_token_id
    answers = [i for i in module.answer_mask(ids[None])[0].nonzero().flatten().tolist() if ids[i] != eos]
    assert len(answers) == len(qas)
    with torch.no_grad():
        packed = module.llava(**inputs).logits[0]
        for (question, _), at in zip(qas, answers):
            alone = module.llava(**module.inputs([picture], module.prompts([question]))).logits[0, -1]
            assert torch.allclose(packed[at - 1], alone, atol=1e-4), question


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    """Stage 2a from a fresh model, 6 steps on one batch of 4 scenes; returns (module, batch, loss before)."""
    from lightning_modules.grounded_pretraining import GroundedPretraining

    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("grounded")
    module = GroundedPretraining(output_dir=str(out), lr=3e-3, warmup_steps=1, noise=0.0)
    data = ShapesBenchmark(train_size=4, batch_size=4, fit_val_size=4, turns=3, images=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)  # the same background dropped before and after
    before = module.loss(batch)[0].item()
    trainer(6).fit(module, datamodule=data)
    return module, batch, before


def test_grounded_pretraining_trains_the_decoder_on_grounded_tokens(grounded):
    module, batch, before = grounded
    assert "image" not in batch and "patch_color" in batch["targets"]
    torch.manual_seed(0)
    assert module.loss(batch)[0].item() < 0.8 * before
    fresh = type(module)(output_dir=module.hparams.output_dir).llava  # same seed: the untrained model
    for name in ("vision_tower", "multi_modal_projector"):
        trained, untouched = getattr(module.llava.model, name), getattr(fresh.model, name)
        assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), untouched.state_dict().values()))


def test_grounded_sequences_read_like_the_prompt_with_the_image_tokens_grounded(grounded):
    module, batch, _ = grounded
    turns = [[qa] for qa in zip(batch["question"], batch["answer"])]
    embeds, mask, positions, labels = module.sequences(batch, turns, drop=False)
    prompt = module.inputs([make_picture()] * len(turns), module.prompts(batch["question"]))
    assert embeds.shape[1] == prompt["input_ids"].shape[1] + 2  # + answer and </s>
    assert torch.equal(positions[:, -1] - 2, prompt["attention_mask"].sum(1) - 1)
    answers = module.processor.tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
    assert answers[::2] == batch["answer"] and set(answers[1::2]) == {"</s>"}
    short = module.sequences(batch, turns, drop=True)[0]
    assert short.shape[1] < embeds.shape[1]  # background dropped while training


def make_picture():
    from data.shapes import make_sample

    return make_sample(0, "val", 0).image()


def test_projector_alignment_trains_the_projector_only_on_the_stage1_tower(stage1, grounded, tmp_path):
    from lightning_modules.projector_alignment import ProjectorAlignment

    vision, decoder = stage1[0].hparams.output_dir, grounded[0].hparams.output_dir
    pl.seed_everything(0)
    module = ProjectorAlignment(decoder, vision_from=vision, output_dir=str(tmp_path), lr=3e-3, warmup_steps=1)
    tower = stage1[0].llava.model.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in module.llava.model.vision_tower.state_dict().items())
    head = grounded[0].llava.lm_head.weight.clone()
    data = ShapesBenchmark(train_size=4, batch_size=4, fit_val_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    before = module.loss(batch)[0].item()
    trainer(8).fit(module, datamodule=data)
    assert module.loss(batch)[0].item() < 0.8 * before
    assert torch.equal(module.llava.lm_head.weight, head)
    assert all(torch.equal(v, tower[k]) for k, v in module.llava.model.vision_tower.state_dict().items())


def test_projector_alignment_refuses_stages_of_different_models(stage1, tmp_path):
    from data.tiny_llava import build_processor, build_tiny_llava
    from lightning_modules.projector_alignment import ProjectorAlignment

    processor = build_processor()
    other = build_tiny_llava(len(processor.tokenizer), processor.tokenizer.convert_tokens_to_ids("<image>"))
    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different tokenizers"):
        ProjectorAlignment(str(tmp_path / "other"), vision_from=stage1[0].hparams.output_dir, output_dir=str(tmp_path))
