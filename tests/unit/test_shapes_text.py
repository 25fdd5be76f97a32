from data.shapes import make_sample
from data.shapes_llava import shapes_processor
from data.shapes_text import scene_words


def test_scene_words_tell_each_object_and_where_its_label_is():
    tokenizer = shapes_processor().tokenizer
    seen = set()
    for index in range(150):
        sample = make_sample(0, "train", index)
        words = scene_words(sample)
        parts = words[: -len(" .")].split(" , ")
        label = sample.text
        on_object = label is not None and label.where == "object"
        assert len(parts) == len(sample.objects) + (label is not None and not on_object)
        for i, (obj, part) in enumerate(zip(sample.objects, parts)):
            code = f" {label.text.lower()}" if on_object and label.target == i else ""
            assert part == f"{obj.color} {obj.shape}{code}"
        if label is not None and not on_object:
            assert parts[-1] == f"{label.text.lower()} in the {label.target} corner"
        assert tokenizer.unk_token_id not in tokenizer(words)["input_ids"]  # every word is in the vocabulary
        seen.add("none" if label is None else label.where)
    assert seen == {"none", "object", "corner"}
