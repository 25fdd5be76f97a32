import pytest
import torch

from data.shapes import make_sample
from data.shapes_llava import shapes_processor
from data.shapes_scene import TEXTS
from data.shapes_targets import COLOR_NAMES, patch_targets
from lightning_modules.grounding import GroundingWords, grounded_tokens, object_patches


@pytest.fixture(scope="module")
def grounded():
    tokenizer = shapes_processor().tokenizer
    table = torch.randn(len(tokenizer), 8, requires_grad=True)
    samples = (make_sample(0, "train", i) for i in range(60))
    sample = next(s for s in samples if s.text is not None and s.text.where == "object")
    targets = {k: v[None] for k, v in patch_targets(sample).items()}
    return tokenizer, table, sample, targets, grounded_tokens(targets, table, GroundingWords(tokenizer))[0]


def test_each_patch_is_the_sum_of_the_words_that_describe_it(grounded):
    tokenizer, table, sample, targets, tokens = grounded
    e = lambda word: table[tokenizer.convert_tokens_to_ids(word)]  # noqa: E731
    t = {k: v[0] for k, v in targets.items()}

    def where(i: int) -> torch.Tensor:
        x, y = t["patch_col"][i] / 23, t["patch_row"][i] / 23
        return (1 - x) * e("left") + x * e("right") + (1 - y) * e("above") + y * e("below")

    background = int((~object_patches(targets)[0]).nonzero()[0])
    assert torch.allclose(tokens[background], e(",") + where(background))
    obj = sample.objects[0]
    plain = (t["patch_color"] == COLOR_NAMES.index(obj.color) + 1) & (t["patch_center"] == 0) & (t["patch_code"] == 0)
    i = int(plain.nonzero()[0])
    assert torch.allclose(tokens[i], e(obj.color) + e(obj.shape) + where(i))
    centre = int(((t["patch_center"] == 1) & (t["patch_code"] == 0)).nonzero()[0])
    c, s = t["patch_color"][centre] - 1, t["patch_shape"][centre] - 1
    from data.shapes_scene import SHAPES

    assert torch.allclose(tokens[centre], e(COLOR_NAMES[c]) + e(SHAPES[s]) + e(".") + where(centre))
    label = int(((t["patch_color"] == len(COLOR_NAMES) + 1) & (t["patch_center"] == 0)).nonzero()[0])
    assert sample.text.text in TEXTS
    assert torch.allclose(tokens[label], e(sample.text.text.lower()) + where(label))


def test_grounded_tokens_train_the_embeddings_they_are_made_of(grounded):
    tokenizer, table, _, _, tokens = grounded
    (grad,) = torch.autograd.grad(tokens.sum(), table)
    assert grad[tokenizer.convert_tokens_to_ids(",")].abs().sum() > 0
    assert grad[tokenizer.convert_tokens_to_ids("user")].abs().sum() == 0  # not a grounding word


def test_a_tokenizer_without_the_grounding_words_is_refused():
    from data.tiny_llava import build_tokenizer

    with pytest.raises(ValueError, match="lacks the grounding words"):
        GroundingWords(build_tokenizer(["red", "circle"]))
