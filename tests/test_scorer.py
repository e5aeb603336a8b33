"""The constitution scorer on hand-written answers: it must tell curiosity from hedging, and be able to fail."""

import pytest

from alignment.constitution import load_constitution
from alignment.scorer import JudgeScorer, RuleScorer, get_scorer

CURIOUS = [
    (
        "Why is the sky blue?",
        "Because air scatters short wavelengths far more than long ones: Rayleigh scattering goes as "
        "1/wavelength^4, so blue light at 450 nm scatters about 5.5 times more than red at 700 nm. That's why "
        "sunsets are red, since the light crosses far more air at dusk. Why not violet? The Sun emits less of it.",
    ),
    (
        "How do I reverse a list in Python?",
        "Use `items.reverse()` in place or `items[::-1]` for a copy; for example `[1, 2, 3][::-1]` gives "
        "`[3, 2, 1]`. If you only loop backwards, `reversed(items)` avoids the copy, which matters for a "
        "list of 1,000,000 elements.",
    ),
    (
        "Should I learn Rust or Go first?",
        "Go first if you want to ship services soon, because you can be productive in a week and gofmt plus "
        "go test remove friction. Rust first for systems work, since the borrow checker teaches ownership "
        "that transfers to C++. What do you want to build in the next 6 months?",
    ),
]

HEDGING = [
    (
        "Why is the sky blue?",
        "That's a great question! There are many factors that could possibly be involved, and it's important "
        "to note that I'm not able to give a definitive answer. You may want to consult an expert.",
    ),
    (
        "Is coffee bad for you?",
        "As an AI language model, I cannot provide medical advice. Everyone is different, so please consult "
        "your doctor.",
    ),
    (
        "Should I learn Rust or Go first?",
        "It really depends on your goals and preferences. Both have pros and cons, and ultimately it's up to you.",
    ),
]


@pytest.mark.parametrize("prompt,answer", CURIOUS)
def test_curious_answers_score_high_and_are_not_hedged(prompt, answer):
    s = RuleScorer().score(prompt, answer)
    assert not s.hedged, s
    assert s.curiosity > 0.5, s
    assert s.total > 0.4, s


@pytest.mark.parametrize("prompt,answer", HEDGING)
def test_hedging_answers_are_flagged_and_score_low(prompt, answer):
    s = RuleScorer().score(prompt, answer)
    assert s.hedged, s
    assert s.details["disclaimers"] >= 1
    assert s.total < 0.0, s


def test_every_curious_answer_outranks_every_hedging_answer():
    scorer = RuleScorer()
    worst_curious = min(scorer.score(p, a).total for p, a in CURIOUS)
    best_hedging = max(scorer.score(p, a).total for p, a in HEDGING)
    assert worst_curious > best_hedging + 0.5


def test_scorer_can_fail_for_the_right_reasons():
    scorer = RuleScorer()
    # A question thrown back instead of an answer is a non-answer: no curiosity credit for the "?".
    dodge = scorer.score("How do I get better at chess?", "What do you mean by better?")
    assert dodge.details["non_answer"] == 1.0 and dodge.details["followup"] == 0.0
    assert dodge.hedged
    # Stacked qualifiers without a boilerplate phrase still count as hedging.
    waffle = scorer.score("Is it going to rain?", "It might possibly rain, perhaps, and it could potentially be dry, maybe.")
    assert waffle.details["qualifiers"] >= 4 and waffle.hedging > 0
    # One precise, honest statement of uncertainty is not hedging.
    honest = scorer.score(
        "Why do we dream?",
        "Nobody knows for sure. The strongest idea is memory consolidation, because REM deprivation hurts "
        "learning in experiments; REM takes about 20 to 25% of an adult's night.",
    )
    assert not honest.hedged and honest.total > 0.3
    # Empty and trivial answers score at the bottom.
    assert scorer.score("Anything?", "").total < scorer.score("Anything?", "Yes, 42 because of Douglas Adams.").total


def test_follow_up_question_only_counts_after_a_real_answer():
    scorer = RuleScorer()
    base = "Tea goes at 80 C for 2 minutes because boiling water pulls out bitter catechins."
    assert scorer.score("tea?", base + " Which tea do you have?").details["followup"] == 1.0
    assert scorer.score("tea?", "Which tea? Green? Black?").details["followup"] == 0.0


def test_judge_scorer_reads_yes_no_probabilities_from_any_causal_lm(tmp_path):
    from _alignment_fixtures import make_tokenizer, tiny_model

    tok = make_tokenizer()
    judge = JudgeScorer(tiny_model(len(tok)).eval(), tok, load_constitution())
    s = judge.score(*CURIOUS[0])
    assert 0.0 <= s.curiosity <= 1.0 and 0.0 <= s.hedging <= 1.0
    assert set(s.details) == {f"p_yes/{p.id}" for p in load_constitution().principles}
    question = judge._question(load_constitution().principle("curiosity"), "Q?", "A.")
    assert "Curiosity" in question and "follow-up question" in question and "Answer yes or no" in question


def test_get_scorer_errors_are_clear():
    assert isinstance(get_scorer("rule"), RuleScorer)
    with pytest.raises(ValueError, match="needs a judge model"):
        get_scorer("judge")
    with pytest.raises(ValueError, match="unknown scorer 'vibes'"):
        get_scorer("vibes")


def test_degenerate_text_gets_no_credit_for_its_numbers():
    scorer = RuleScorer()
    noise = scorer.score("Why do we have leap years?", "Annnnnnnnnn meting, and and is about 20000000000000000000.")
    plain = scorer.score("Why do we have leap years?", "Because the year is about 365.25 days long, so we add a day.")
    assert noise.details["degenerate"] == 1.0 and plain.details["degenerate"] == 0.0
    assert plain.total > noise.total
    loop = scorer.score("Q?", "the cat the cat the cat the cat the cat the cat 42 43 44")
    assert loop.details["degenerate"] == 1.0


def test_pairs_rank_by_the_scorer_and_skip_prompts_without_a_preference():
    from alignment.pairs import pair_from_ranking, rank_answers

    prompt, curious = CURIOUS[0]
    hedge = HEDGING[0][1]
    ranked = rank_answers(prompt, [hedge, curious, "", curious], RuleScorer())
    assert [a for _, a in ranked] == [curious, hedge]  # empty and duplicate answers dropped, best first
    pair = pair_from_ranking(prompt, ranked, min_margin=0.1)
    assert pair["chosen"] == [{"role": "assistant", "content": curious}]
    assert pair["rejected"] == [{"role": "assistant", "content": hedge}]
    assert pair["prompt"] == [{"role": "user", "content": prompt}] and pair["score_chosen"] > pair["score_rejected"]
    assert pair_from_ranking(prompt, [(0.30, "a"), (0.25, "b")], min_margin=0.1) is None  # gap too small
    assert pair_from_ranking(prompt, ranked[:1], min_margin=0.0) is None  # one distinct answer is no pair
