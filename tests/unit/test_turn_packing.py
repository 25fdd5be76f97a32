import torch

from lightning_modules.turn_packing import isolated_turns


def test_each_turn_sees_the_prefix_and_itself_at_single_turn_positions():
    # row 0: 2 pads, prefix of 3, turns of 2 and 3; row 1: prefix of 2, turns of 3, 2 and 2
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    mask, pos = isolated_turns(attention, [[2, 3], [3, 2, 2]])
    m = mask[:, 0]
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 3, 4, 5]
    assert pos[1].tolist() == [0, 0, 1, 2, 3, 4, 2, 3, 2, 3]
    # row 0, last token of turn 2 (index 9): the prefix (2..4) and its own turn (7..9), not turn 1 nor pads
    assert m[0, 9].nonzero().flatten().tolist() == [2, 3, 4, 7, 8, 9]
    # row 1, turn 3's second token (index 9) sees prefix (1, 2) and itself (8, 9)
    assert m[1, 9].nonzero().flatten().tolist() == [1, 2, 8, 9]
    # causal inside the prefix; padding queries see only themselves
    assert m[0, 3].nonzero().flatten().tolist() == [2, 3]
    assert m[0, 0].nonzero().flatten().tolist() == [0]


def test_packed_turns_give_the_logits_of_separate_single_turn_sequences():
    from conftest import make_llava

    model = make_llava().eval()
    lm = model.model.language_model
    torch.manual_seed(0)
    prefix, t1, t2 = torch.randint(5, 50, (4,)), torch.randint(5, 50, (3,)), torch.randint(5, 50, (2,))
    ids = torch.cat([prefix, t1, t2])[None]
    mask, pos = isolated_turns(torch.ones_like(ids), [[3, 2]])
    with torch.no_grad():
        packed = lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[0]
        alone = lm(input_ids=torch.cat([prefix, t2])[None]).last_hidden_state[0]
    assert torch.allclose(packed[-2:], alone[-2:], atol=1e-5)


def test_dropping_tokens_gives_the_logits_of_the_sequence_without_them():
    from conftest import make_llava

    from lightning_modules.turn_packing import drop_tokens

    model = make_llava().eval()
    lm = model.model.language_model
    torch.manual_seed(0)
    ids = torch.randint(5, 50, (2, 9))
    mask, pos = isolated_turns(torch.tensor([[0] + [1] * 8, [1] * 9]), [[2, 2], [3]])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, [2, 4]] = False  # two prefix tokens of row 0
    embeds = lm.embed_tokens(ids)
    short_mask, short_pos, short_embeds, short_ids = drop_tokens(keep, mask, pos, embeds, ids)
    assert short_embeds.shape[1] == 9 and short_ids[0, -6:].tolist() == ids[0, [1, 3, 5, 6, 7, 8]].tolist()
    assert short_pos[0, -6:].tolist() == pos[0, [1, 3, 5, 6, 7, 8]].tolist()  # kept tokens keep their positions
    with torch.no_grad():
        short = lm(inputs_embeds=short_embeds, attention_mask=short_mask, position_ids=short_pos).last_hidden_state
        alone = lm(inputs_embeds=embeds[:1, [1, 3, 5, 6]], position_ids=pos[:1, [1, 3, 5, 6]]).last_hidden_state
        full = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    assert torch.allclose(short[0, -6:-2], alone[0], atol=1e-5)  # the first turn, as if never given the dropped
    assert torch.allclose(short[1], full[1], atol=1e-5)  # a row that keeps everything is unchanged
    assert not short_mask[0, 0, 0, 1:].any() and short_mask[0, 0, 0, 0]  # padding sees itself only
