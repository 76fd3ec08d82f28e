"""The answer reader (medicalgpt/answers.py) on replies as models write them: a labelled corpus of hand-written forms
and real SmolLM2-135M-Instruct replies (tests/assets/answers/), properties that no explanation, negated mention,
letter width or case changes what is read, and the README's table of rules matching the module's."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medicalgpt import answers
from medicalgpt.answers import RULES, read_answer
from medicalgpt.eval.choice import parse_choice
from medicalgpt.rl.verifiable import choice_accuracy
from tests.helpers import REPO, answer_corpus

CORPUS = answer_corpus()


def test_the_corpus_is_large_bilingual_and_labelled_by_named_rules():
    assert len(CORPUS) >= 300 and len({row["id"] for row in CORPUS}) == len(CORPUS)
    assert {row["language"] for row in CORPUS} == {"en", "zh"}
    assert sum(row["source"] == "smollm2-135m-instruct" for row in CORPUS) >= 100
    for row in CORPUS:
        assert row["rule"] in RULES, row["id"]
        assert row["expected"] is None or set(row["expected"]) <= set(row["options"]), row["id"]


@pytest.mark.parametrize("row", CORPUS, ids=[row["id"] for row in CORPUS])
def test_the_reader_agrees_with_every_labelled_reply(row):
    assert read_answer(row["reply"], row["options"]) == row["expected"], row["rule"]


# -- properties --------------------------------------------------------------------------------------------------

OPTIONS = "ABCDE"
COMMITTED_EN = [
    "The answer is {x}.",
    "Answer: {x}",
    "**Final answer:** {x}",
    "The correct answer is ({x}).",
    "{x}",
    "({x}) {text}",
    "{x}. {text}",
    "Option {x} is correct.",
]
COMMITTED_ZH = [
    "答案：{x}",
    "答案是{x}。",
    "正确答案为（{x}）",
    "故选{x}。",
    "{x}",
    "{x}、{text}",
    "选项{x}",
    "{x}项正确。",
]
BEFORE = [
    "",
    "Let me think about the mechanism first. ",
    "先分析题干：患者出现心悸、多汗。",
    "<think>\n{y}?\n</think>\n\n",
]
AFTER = [
    "",
    " It is the first-line treatment.",
    "\n解析：{y}项是干扰项，其余选项描述的是慢性病程。",
    " The others describe chronic disease.",
    "\n\nExplanation: this fits the lab values in the stem.",
]
NEGATED_EN = ["{y} is wrong because it is rare. ", "Not {y}. ", "We can rule out {y}. ", "Option {y} is incorrect. "]
NEGATED_ZH = ["{y}选项错误，", "不选{y}，", "排除{y}，", "{y}项不对。"]


@st.composite
def committed_replies(draw):
    """(reply, letters): a committed answer in an answer form, wrapped in explanation text before and after."""
    letters = draw(st.sampled_from(OPTIONS))
    other = draw(st.sampled_from([c for c in OPTIONS if c != letters]))
    form = draw(st.sampled_from(COMMITTED_EN + COMMITTED_ZH))
    answer = form.format(x=letters, text="Graves disease")
    lead = form.startswith(("{x}", "({x})", "选项"))  # an answer form at the start: nothing goes before it
    before = "" if lead else draw(st.sampled_from(BEFORE)).format(y=other)
    after = draw(st.sampled_from(AFTER)).format(y=other)
    if form == "{x}" and after.startswith(" "):  # a bare letter, then its explanation on the next line
        after = "\n" + after[1:]
    return before + answer + after, letters, other, lead


def full_width(text):
    return "".join(chr(ord(c) + 0xFEE0) if "A" <= c <= "Z" else c for c in text)


@settings(max_examples=300, deadline=None, database=None)
@given(committed_replies())
def test_an_explained_answer_reads_as_its_letter(case):
    reply, letters, _, _ = case
    assert read_answer(reply, OPTIONS) == letters


@settings(max_examples=300, deadline=None, database=None)
@given(committed_replies(), st.sampled_from(NEGATED_EN + NEGATED_ZH), st.booleans())
def test_a_negated_mention_of_another_letter_changes_nothing(case, negation, in_front):
    reply, letters, other, lead = case
    mention = negation.format(y=other)
    if in_front and not lead:
        changed = mention + reply
    else:
        changed = reply + ("\n" if reply[-1].isalnum() else " ") + mention
    assert read_answer(changed, OPTIONS) == read_answer(reply, OPTIONS) == letters


@settings(max_examples=300, deadline=None, database=None)
@given(committed_replies(), st.sampled_from(["full", "lower"]))
def test_letter_width_and_case_change_nothing(case, change):
    reply, letters, _, _ = case
    if change == "full":
        changed = reply.replace(letters, full_width(letters))
    else:  # lower case where the letter stands as an answer: the letter alone, or followed by punctuation or a cue
        changed = re.sub(rf"(?<![A-Za-z]){letters}(?=[.)）。、:]|$|项)", letters.lower(), reply)
    assert read_answer(changed, OPTIONS) == letters


# -- the tables in docs/stages.md and README_zh.md --------------------------------------------------------------------


def rule_rows(text):
    """The rows of the table between <!-- answer-rules --> and <!-- /answer-rules -->: (rule, reply, reads) cells."""
    tables = re.findall(r"<!-- answer-rules -->\n(.*?)<!-- /answer-rules -->", text, re.DOTALL)
    return [
        [[cell.strip() for cell in line.strip().strip("|").split(" | ")][:3] for line in table.splitlines()[2:]]
        for table in tables
    ]


def test_the_readme_tables_in_english_and_chinese_match_the_reader_docstring():
    (documented,) = rule_rows(answers.__doc__)
    (english,) = rule_rows((REPO / "docs" / "stages.md").read_text(encoding="utf-8"))
    (chinese,) = rule_rows((REPO / "README_zh.md").read_text(encoding="utf-8"))
    assert {row[0] for row in documented} == set(RULES)
    assert english == documented and chinese == documented


def test_every_example_of_the_table_reads_as_the_table_says():
    (documented,) = rule_rows(answers.__doc__)
    for rule, examples, reads in documented:
        replies = [reply.replace("\\n", "\n") for reply in re.findall(r"`([^`]*)`", examples)]
        expected = reads.split(", ") if ", " in reads else [reads] * len(replies)
        read = [read_answer(reply, "ABCDE") or "none" for reply in replies]
        assert read == expected, rule


def test_grpo_reward_and_generate_mode_score_every_corpus_reply_alike():
    """The same reply is right or wrong alike in GRPO's choice_accuracy (exam rows: options as letters, completions
    plain or conversational) and in evaluate.py's generate mode (items: options as {letter: text})."""
    for row in CORPUS:
        item = {"options": {letter: f"text {letter}" for letter in row["options"]}}
        for answer in [row["expected"] or row["options"][0], row["options"][-1]]:
            evaluated = 1.0 if parse_choice(row["reply"], item) == answer else 0.0
            plain, chat = choice_accuracy(
                [row["reply"], [{"role": "assistant", "content": row["reply"]}]], [answer] * 2, [row["options"]] * 2
            )
            assert plain == chat == evaluated, row["id"]
        assert choice_accuracy([row["reply"]], [row["expected"] or "none"], [row["options"]]) == [
            1.0 if row["expected"] else 0.0
        ], row["id"]
