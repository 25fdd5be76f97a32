"""Between the two stages of the tiny LLaVA: the decoder learns the questions on scenes told in words.

LLaVA's decoder (Vicuna) could read and answer before it ever saw an image; instruction tuning then
only had to bring the image to it. Ours starts from random weights, and learning from images alone
was too slow for the CPU budget: the decoder must learn to find the named object, read what is bound
to it, count and compare, and on 576-token sequences one step costs seconds. On the scene in words
(`data.shapes_text`, about 20 tokens) the same conversations cost a fraction of that, so here the
decoder learns them first. Nothing else changes: same chat format, same answers-only loss, the scene
words standing where the image tokens will stand (`QAFinetuning`); tower and projector untouched.
Stage 2 (`lightning_modules.qa_finetuning`) starts from the folder this exports.
"""

from __future__ import annotations

from .qa_finetuning import QAFinetuning


class TextPretraining(QAFinetuning):
    """Decoder training on text scenes (`ShapesBenchmark(scene_text=True)`); tower and projector frozen.

    Args: as `QAFinetuning`; `model_name_or_path` is the stage-1 folder and `output_dir` the folder
    stage 2 starts from.
    """

    def __init__(
        self,
        model_name_or_path: str = "runs/train_tiny_llava/vision/model",
        output_dir: str = "runs/train_tiny_llava/text/model",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        prompt: str = "{question}",
    ) -> None:
        super().__init__(model_name_or_path, output_dir, lr, weight_decay, warmup_steps, prompt)
        self.llava.model.multi_modal_projector.requires_grad_(False)

    def encode(self, batch: dict, texts: list[str]) -> dict:
        """The chat texts with each sample's scene words where its image tokens would be."""
        if "scene" not in batch:
            raise ValueError("TextPretraining needs scene descriptions: set the data's scene_text: true")
        image = self.processor.image_token
        texts = [text.replace(image, scene, 1) for text, scene in zip(texts, batch["scene"])]
        tokenizer = self.processor.tokenizer
        return tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
