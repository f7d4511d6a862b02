"""Tests of mentor.lm.align: token alignment through character offsets and teacher-guided weights, with two
different locally trained tokenizers (byte-level BPE at 512 and at 300 tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mentor import losses
from mentor.lm.align import align_tokens, aligned_teacher_loss, offsets_overlap, teacher_guided_weights

TEXT = "Return the sum of x and y."

# Hand-written offsets of TEXT under two tokenizations (what the 300- and 512-token BPEs of CPython 3.11's corpus
# give; written out here so the test does not depend on the corpus):
#   student: R|et|ur|n|_the|_s|u|m|_o|f|_|x|_a|nd|_|y|.      teacher: Return|_the|_s|um|_of|_|x|_and|_|y|.
STUDENT = [(0, 1), (1, 3), (3, 5), (5, 6), (6, 10), (10, 12), (12, 13), (13, 14), (14, 16), (16, 17), (17, 18),
           (18, 19), (19, 21), (21, 23), (23, 24), (24, 25), (25, 26)]
TEACHER = [(0, 6), (6, 10), (10, 12), (12, 14), (14, 17), (17, 18), (18, 19), (19, 23), (23, 24), (24, 25),
           (25, 26)]


def test_alignment_of_a_hand_checked_string() -> None:
    assert [TEXT[a:b] for a, b in TEACHER] == ["Return", " the", " s", "um", " of", " ", "x", " and", " ", "y", "."]
    got = align_tokens(STUDENT, TEACHER)
    assert got == [[0], [0], [0], [0], [1], [2], [3], [3], [4], [4], [5], [6], [7], [7], [8], [9], [10]]
    # the other direction: a teacher token maps to every student piece of it
    back = align_tokens(TEACHER, STUDENT)
    assert back[0] == [0, 1, 2, 3] and back[3] == [6, 7] and back[7] == [12, 13] and back[10] == [16]


def test_overlap_rules_by_hand() -> None:
    # a span straddling two teacher tokens; an empty special-token span; two byte pieces of one character
    student = [(0, 0), (2, 5), (5, 6), (5, 6)]
    teacher = [(0, 0), (0, 3), (3, 4), (4, 6)]
    assert offsets_overlap(student, teacher).tolist() == [
        [False, False, False, False],
        [False, True, True, True],
        [False, False, False, True],
        [False, False, False, True],
    ]
    batched = offsets_overlap(torch.tensor([student, student]), torch.tensor([teacher, teacher]))
    assert batched.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="end is before its start"):
        offsets_overlap([(3, 1)], teacher)


def test_alignment_with_two_real_tokenizers_matches_a_character_ownership_reference() -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from mentor.lm import data

    teacher_tok, student_tok = data.tokenizer(512), data.tokenizer(300)
    for text in (TEXT, "naïve café: résumé = 3 * x", "def f(a, b):\n    return a + b"):
        s = student_tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        t = teacher_tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        assert s != t  # really two tokenizations
        # reference: which teacher tokens own each character, then the union over a student token's characters
        owners: list[set[int]] = [set() for _ in text]
        for j, (a, b) in enumerate(t):
            for c in range(a, b):
                owners[c].add(j)
        want = [sorted(set().union(*(owners[c] for c in range(a, b)))) for a, b in s]
        assert align_tokens(s, t) == want
        assert all(want)  # every student token of plain text overlaps some teacher token


def test_aligned_teacher_loss_and_guided_weights_by_hand() -> None:
    overlap = offsets_overlap(STUDENT[:6], TEACHER[:3])
    # student tokens 0-3 -> teacher 0, 4 -> teacher 1, 5 -> teacher 2
    teacher_loss = torch.tensor([2.0, 0.5, 1.0])
    student_loss = torch.tensor([3.0, 2.5, 1.0, 4.0, 0.6, 3.0])
    ref, aligned = aligned_teacher_loss(teacher_loss, overlap)
    assert ref.tolist() == [2.0, 2.0, 2.0, 2.0, 0.5, 1.0] and aligned.all()
    # excess = [1.0, 0.5, -1.0, 2.0, 0.1, 2.0]; keep ceil(0.5 * 6) = 3 largest: tokens 3, 5 (2.0, earlier first), 0
    w = teacher_guided_weights(student_loss, teacher_loss, overlap, select=0.5)
    assert w.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    # a student token without a target, and one aligned with nothing, get weight 0
    valid = torch.tensor([True, True, True, False, True, True])
    lonely = overlap.clone()
    lonely[5] = False
    w2 = teacher_guided_weights(student_loss, teacher_loss, lonely, select=1.0, valid=valid)
    assert w2.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # mean aggregation over a student token overlapping two teacher tokens
    two = torch.tensor([[True, True, False]])
    mean, _ = aligned_teacher_loss(teacher_loss, two, aggregate="mean")
    maxi, _ = aligned_teacher_loss(teacher_loss, two, aggregate="max")
    assert mean.tolist() == [1.25] and maxi.tolist() == [2.0]


def test_guided_weights_drive_the_students_language_modelling_loss() -> None:
    """End to end on the hand-checked string: per-token losses of two models with different vocabularies (300 and
    512), weights from the alignment, the student's weighted cross-entropy through mentor.losses."""
    g = torch.Generator().manual_seed(0)
    s_ids = torch.randint(0, 300, (len(STUDENT),), generator=g)
    t_ids = torch.randint(0, 512, (len(TEACHER),), generator=g)
    s_logits = torch.randn(len(STUDENT), 300, generator=g, requires_grad=True)
    t_logits = torch.randn(len(TEACHER), 512, generator=g)
    # token i's loss comes from the logits at i - 1: the first token of each has no loss
    s_loss = torch.cat([torch.zeros(1), F.cross_entropy(s_logits[:-1], s_ids[1:], reduction="none")])
    t_loss = torch.cat([torch.zeros(1), F.cross_entropy(t_logits[:-1], t_ids[1:], reduction="none")])
    overlap = offsets_overlap(STUDENT, TEACHER)
    overlap[:, 0] = False  # the teacher's first token has no loss
    valid = torch.ones(len(STUDENT), dtype=torch.bool)
    valid[0] = False
    w = teacher_guided_weights(s_loss, t_loss, overlap, select=0.5, valid=valid)
    # student tokens 1-3 overlap only the teacher's first token: unaligned after the exclusion
    assert w[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and int(w.sum()) == 7  # ceil(0.5 * 13) of 13 candidates
    loss = losses.cross_entropy(s_logits[:-1], s_ids[1:], mask=w[1:], num_items=int(valid.sum()))
    want = (w[1:] * F.cross_entropy(s_logits[:-1], s_ids[1:], reduction="none")).sum() / 16
    torch.testing.assert_close(loss, want)
