"""A shapes scene told in words, for the text pre-training of the tiny LLaVA's decoder.

LLaVA starts from a decoder that already reads and answers (Vicuna); ours starts from nothing, so
before it meets images it learns the benchmark's questions on scenes written out as words, in the
image's place: "red star ak , blue circle . what is written on the star ? ASSISTANT: ak". What it
learns there (find the named object, read an attribute bound to it, count, check a pair) is what
stage 2 then reaches through the projector. Spatial relations are not told: the words carry no
positions, so the spatial family is learnt on images only.
"""

from __future__ import annotations

from data.shapes import Sample

# Words scene descriptions use beyond the benchmark's own (`data.shapes_questions.vocabulary`).
SCENE_WORDS = [",", ".", "top", "bottom"]


def scene_words(sample: Sample) -> str:
    """The scene as words: each object "colour shape" (then its label's code when it carries one),
    joined by " , "; a corner label as "code in the top left corner"; ending with " .". Lowercase,
    one space between words, as the tokenizer splits them."""
    label = sample.text
    parts = []
    for i, obj in enumerate(sample.objects):
        words = f"{obj.color} {obj.shape}"
        if label is not None and label.where == "object" and label.target == i:
            words += f" {label.text.lower()}"
        parts.append(words)
    if label is not None and label.where == "corner":
        parts.append(f"{label.text.lower()} in the {label.target} corner")
    return " , ".join(parts) + " ."
