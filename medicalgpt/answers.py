"""Which option letters a reply to a multiple-choice item commits to: the one reader behind GRPO's
`choice_accuracy` reward (medicalgpt/rl/verifiable.py) and evaluate.py's `--choice_mode generate` scoring
(medicalgpt/eval/choice.py), so that a reply scores the same in training and in evaluation.

`read_answer(reply, options)` returns the letters, sorted ("B", "AC"), or None. The reply is read in the steps
below, in order; the first step that finds letters decides. Letters are normalised first: full-width `Ａ-Ｚ` and
punctuation become ASCII, Markdown emphasis (`**`, `__`) is dropped, lower case counts where a letter stands as an
answer (after a cue or in an answer form, never as the article "a"); letters that are not options of the item are
ignored; several letters (`、 ， , / & 和 及 与 and`) make a multi-select set. The table, `rule` being the name the
labelled corpus (tests/assets/answers/) gives each reply:

<!-- answer-rules -->
| rule | reply | reads |
|---|---|---|
| think | `<think>答案是C吗？不对</think>答案是B` | B |
| unclosed-think | `<think>答案是C……` | none |
| answer-tag | `分析……<answer>C</answer>`, `\\boxed{C}` | C |
| cue | `The answer is B. Option A is wrong because it is rare.` | B |
| cue | `答案：C\\n解析：选择A的同学忽略了禁忌症。` | C |
| cue | `**Final answer:** (d)`, `故选D`, `正确答案是 A、C` | D, D, AC |
| letter-cue | `Option B is correct.`, `B项正确` | B |
| negated | `答案是B，A选项错误。`, `Not A: the answer is B` | B |
| negated | `不选A，也排除C`, `Neither A nor B is right.` | none |
| only-letters | `B`, `**b**`, `(B)`, `A、C`, `Ｂ` | B, B, B, AC, B |
| leading | `(C) Graves disease`, `C. ...`, `C、...`, `选项B`, `B项` | C, C, C, B, B |
| hedge | `The answer is A or B.`, `答案可能是A或C` | none |
| conflict | `C. Thyroid lymphoma\\nThe answer is E.`, `A. 13\\nThis answer is not correct.` | none |
| not-an-option | `答案：F` (options A-E) | none |
| option-list | `A. Hashimoto\\nB. Graves\\nC. ...` (the options repeated) | none |
| none | `A 45-year-old man presents with chest pain ...` | none |
<!-- /answer-rules -->

In words:
- think: a closed `<think>...</think>` block is removed first (what follows the last `</think>` is the answer);
  unclosed-think: a `<think>` that never closes means no answer (the model ran out of tokens while reasoning).
- answer-tag: `<answer>...</answer>` (or LaTeX `\\boxed{...}`, `\\boxed{\\text{C}}`) wins; its content is read by
  the steps below.
- cue / letter-cue: the first final-answer cue followed by letters decides: 答案是 / 答案： / 答： / 正确答案 /
  正确选项 / 最终答案 / 【答案】 / 故选 / 应选 / 本题选 / 所以选 / 选择B / the answer is / answer: / correct answer /
  correct option / best choice / final answer / I choose / I'd say / Choose (B) / it's B (ending the clause) /
  我认为是 / 正确的是 ..., or a letter followed by "is correct" / "is the answer" / ": correct" / 正确 /
  是正确的. Letters an explanation mentions after it do not count; a cue after a repeated option list still answers.
- negated: 不选A, 排除A, A错误, A选项错误, A不对, A is wrong, A is incorrect, A: wrong, not A, rule out A, Neither A
  nor B never count, wherever they stand.
- only-letters: a reply that is only letters (brackets, emphasis, punctuation and separators aside) is its answer.
- leading: an answer form at the start: `(C) ...`, `C. ...`, `C、...`, `C: ...`, `C) ...`, `选项B`, `B项`,
  `Option B`, or a first line that is only letters.
- hedge: a cue or answer form whose letter is followed by "or" / 或 / 还是 and another letter, or by "but B is also
  plausible" / "but B could be right" / 但B也有可能, commits to nothing.
- conflict: an answer form at the start and a cue naming other letters, with no correction between them ("no,
  wait", "actually", 不对), or an answer the reply calls wrong ("This answer is not correct"): no answer.
- not-an-option: letters that are not options of the item are ignored; a cue naming only such letters reads nothing.
- option-list: a reply whose lines repeat two or more options (`A. ...`, `B. ...`, or `A、x B、y` in order on one
  line) commits to none of them; a cue after the list still answers.
- none: no cue and no answer form: no answer (an article "A" starting a sentence is not option A).
"""

import re

ALL_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RULES = (
    "think",
    "unclosed-think",
    "answer-tag",
    "cue",
    "letter-cue",
    "negated",
    "only-letters",
    "leading",
    "hedge",
    "conflict",
    "not-an-option",
    "option-list",
    "none",
)

# -- normalisation -----------------------------------------------------------------------------------------------

_FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_EMPHASIS = re.compile(r"\*\*|__|\*(?=[A-Za-z(])|(?<=[A-Za-z.)])\*")
_MASK = "¤"  # what a negated letter is replaced with: never a letter

# -- letter runs -------------------------------------------------------------------------------------------------

_SEP = r"(?:\s*(?:[,、/&;+]|和|及|与|以及|\band\b)\s*)"
# a letter standing alone: not part of a word ("B-cell", "A's"); a lower-case one also not an article ("a rare")
_ANY = r"(?:[A-Z](?![A-Za-z0-9]|-[A-Za-z0-9]|'[A-Za-z])|[a-z](?![A-Za-z0-9]|-[A-Za-z0-9]|'[A-Za-z]|\s+[a-z]))"
# a run of letters: "B", "A、C", "A, C and D", "AC" (a contiguous run only in upper case and not before a word)
_RUN = rf"(?:[A-Z]{{2,8}}(?![A-Za-z0-9]|\s+[A-Za-z])|{_ANY}(?:{_SEP}(?:and\s+)?{_ANY})*)"
_OPEN = r"[(\[【《{「$\"“‘']*\s*"
_HEDGE = re.compile(
    r"^\s*[)\]】》}」$]*\s*(?:,?\s*\bor\b(?:\s+(?:maybe|possibly|perhaps))?|或者?|还是|或许是?|也可能是?)\s*"
    rf"(?:option\s*|选项\s*)?{_OPEN}[A-Za-z](?![A-Za-z])"
    # "D, but B is also plausible", "D，但B也有可能": a second letter held open
    r"|^\s*[)\]】》}」$\"”’]*\s*[.,;，；。]?\s*(?:\bbut\b|但是?|不过)\s*(?i:option\s*|选项\s*)?[(]?[A-Z](?![A-Za-z])[)]?"
    r"\s*(?:(?i:is|are)\s+also\s+(?i:plausible|possible|correct|right|reasonable|likely)|(?i:could|might|may)\s+"
    r"(?i:also\s+)?be\s+(?i:right|correct|the\s+answer)|也(?:有可能|可能|对|正确))"
)

# -- cues --------------------------------------------------------------------------------------------------------

_CUE_ZH = (
    r"(?:最终|正确|参考|标准)?答案[】\]」]?(?:应该?|可能)?(?:是|为|选|选择|应为|应是)?|正确(?:的)?选项(?:是|为)?|答\s*[:：]"
    r"|(?:故|应该?|本题|此题|该题|这道?题|所以|因此|因而|综上|则|我|可|宜|当)(?:选|选择)|(?:^|(?<=[，,;；]))\s*选(?:择(?![的:：]))?(?!项)"
    r"|(?:我认为|我觉得|我选的|正确的(?:选项|答案)?|对的)是|是\s*[:：](?=\s*[(（]?[A-Z][)）.、:：])"
    r"|(?:不是|并非|而非)\s*¤\s*[，,]?\s*而?是"  # 答案不是A，是C: what follows the negated letter
)
_CUE_EN = (
    r"\b(?:the\s+)?(?:(?:final|correct|right|best|most\s+(?:likely|appropriate|accurate))\s+"
    r"(?:answer|option|choice|response)s?|answers?)\b(?:\s+(?:is|are|would\s+be|should\s+be|will\s+be))?"
    r"|\bI(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|pick|select|go\s+with)\b|\bI(?:\s+would|'d)\s+say\b"
    r"|(?:^|(?<=[.!]\s))(?:choose|select|pick)(?=\s)"  # "Choose (B)."
    r"|\bnot\s+¤\s*[,;]?\s*but(?:\s+rather)?\b"  # not A but C
    r"|\bans\s*(?=[:：])"
)
# "it's B", "it is B": only a letter that ends the clause (not "It is A common cause")
_CLAUSE_CUE = re.compile(
    r"(?i:\bit(?:'s|\s+is|\s+must\s+be|\s+should\s+be))\s+(?i:option\s+)?[(]?(?P<run>[A-Z])[)]?"
    r"(?=\s*(?:[.,;!。，]|$))"
)
_FILLER = (
    r"(?:\s*(?i:indeed|definitely|clearly|probably)?\s*[:=\-–—]?\s*(?:是|为|选|选择|应为)?"
    r"\s*(?:options?|choices?|选项)?\s*[:：]?\s*)"
)
_CUE = re.compile(rf"(?:{_CUE_ZH}|(?i:{_CUE_EN})){_FILLER}{_OPEN}(?P<run>{_RUN})")
_LETTER_CUE = re.compile(
    rf"(?<![A-Za-z])(?:(?i:option|choice)\s*|选项\s*)?{_OPEN}(?P<run>[A-Z](?:{_SEP}[A-Z])*|(?<=\()[a-z](?=\)))"
    rf"(?![A-Za-z0-9])\s*[)\]】》}}」]?\s*(?:项|选项)?\s*[:：]?\s*"
    r"(?:(?i:is|are)\s+(?i:the\s+)?(?i:correct|right|true|best|most\s+likely)(?:\s+(?i:answer|option|choice|one))?\b"
    r"|(?i:is|are)\s+(?i:the\s+)?answer\b|(?:是|为)?(?:都|均|也)?(?:正确|对(?!应))的?(?:答案|选项)?"
    r"|(?:(?<=[:：])|(?<=[:：][ \t]))(?i:correct|right|true)\b)"  # "- C: correct"
)
_NOT_A_LETTER_CUE = re.compile(r"(?i:vitamin|hepatitis|type|group|class|factor|protein|grade|stage|phase|lead)\s+$")

# -- negations ---------------------------------------------------------------------------------------------------

_L = r"[A-Za-z]"
_NEGATED = [
    re.compile(rf"(?:不选|不是|排除|并非|而非|除外|不应选|不能选)\s*(?:选项)?\s*{_OPEN}(?P<l>{_L})(?![A-Za-z])"),
    re.compile(
        r"(?<![A-Za-z])(?P<l>[A-Z](?:[ \t]*(?:[、/&]|和|及|与)[ \t]*[A-Z])*)"  # "A、B均错误": the whole run
        r"[ \t]*[)\]】]?[ \t]*(?:选项|项)?[ \t]*[:：]?[ \t]*(?:是|都|均|也)?"
        r"(?:错误|不对|不正确|错|不符|可以?排除|被排除|不是(?:正确)?(?:答案|选项))(?![ \t]*[A-Za-z])"
    ),
    re.compile(
        rf"(?i:\bnot\s+(?:option\s+|choice\s+)?|\bneither\s+(?:option\s+)?|\bnor\s+(?:option\s+)?|"
        rf"\brul(?:e|es|ed|ing)\s+out\s+(?:option\s+)?|\bexclud(?:e|es|ed|ing)\s+(?:option\s+)?|"
        rf"\beliminat(?:e|es|ed|ing)\s+(?:option\s+)?)\(?(?P<l>{_L})(?![A-Za-z])"
    ),
    re.compile(
        r"(?<![A-Za-z])(?P<l>[A-Z])\)?[ \t]+(?i:is|are)\s+(?i:not\s+(?:the\s+)?(?:correct|right|answer)|"
        r"(?:wrong|incorrect|false|unlikely)|less\s+likely)"
    ),
    # "- A: wrong"
    re.compile(r"(?<![A-Za-z])(?P<l>[A-Z])[ \t]*[)\]]?[ \t]*[:：\-–—][ \t]*(?i:wrong|incorrect|false)\b"),
]

# -- answer forms ------------------------------------------------------------------------------------------------

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_TAG = re.compile(
    r"<answer>(.*?)</answer>|\\boxed\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?([^{}]*)\}?\s*\}", re.DOTALL
)
_ONLY = re.compile(rf"^[\s(\[【《{{「'\"$>#]*(?P<run>{_RUN})[\s)\]】》}}」'\".。,，;；!！$]*$")
_BECAUSE = r"[,，]\s*(?=(?i:because|since|as|given|due\s+to)\b|因为|由于)"  # "A, because ..."
_LEAD_PREFIX = r"^[\s>#\-]*(?:(?i:answer|答)\s*[:：]?\s*)?"
_LEADING = [
    re.compile(rf"{_LEAD_PREFIX}[(\[【]\s*(?P<run>{_RUN})\s*[)\]】]"),
    re.compile(rf"{_LEAD_PREFIX}(?P<run>[A-Z](?:{_SEP}[A-Z])*|[A-Z]{{2,8}})\s*(?:[.:、)]|\s+[-–—]\s|{_BECAUSE})"),
    re.compile(rf"{_LEAD_PREFIX}(?P<run>[a-z])\s*(?:\.(?![A-Za-z])|[)、])"),  # not "e.g."
    re.compile(rf"{_LEAD_PREFIX}(?:选项|(?i:options?)\s*){_OPEN}(?P<run>{_RUN})"),
    re.compile(rf"{_LEAD_PREFIX}(?P<run>[A-Za-z](?:{_SEP}[A-Za-z])*)\s*(?:项|选项)"),
    re.compile(rf"{_LEAD_PREFIX}(?P<run>{_RUN})\s*(?:\n|$)"),
]
# the reply takes its answer back, or corrects it (then the later answer stands)
_RETRACTED = re.compile(
    r"(?i:\bthis\s+(?:answer|option|choice)\s+is\s+(?:not\s+(?:correct|right|possible)|incorrect|wrong)\b"
    r"|\ball\s+(?:the\s+)?options\s+are\s+(?:incorrect|wrong)\b)|(?:以上|这个|该)(?:答案|选项)(?:不对|错误|不正确)"
)
_CORRECTION = re.compile(r"(?i:\bno\b[,.]?\s*wait\b|\bwait\b|\bactually\b|\bcorrection\b|\bI\s+mean\b)|不对|更正|纠正")
_OPTION_LINE = re.compile(r"^\s*[(\[]?(?P<l>[A-Z])\s*[.:、)\]]\s*\S", re.MULTILINE)
_INLINE_OPTION = re.compile(r"(?:^|(?<=\s))[(\[]?(?P<l>[A-Z])\s*[.:、)\]]\s*\S")


def read_answer(reply, options=ALL_LETTERS):
    """The option letters `reply` commits to, sorted ("B", "AC"), or None: see the module docstring."""
    return read_reply(reply, options)[0]


def read_reply(reply, options=ALL_LETTERS):
    """(letters or None, the rule that decided): the rule names of the module docstring's table."""
    text = normalise(reply or "")
    if _THINK_CLOSE in text:
        text = text.rsplit(_THINK_CLOSE, 1)[1]
    elif _THINK_OPEN in text:
        return None, "unclosed-think"
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = next(part for part in tags[-1] if part) if any(tags[-1]) else ""
        return read_committed(inner, options)[0], "answer-tag"
    return read_committed(text, options)


def normalise(text):
    """Full-width letters and punctuation as ASCII, Markdown emphasis dropped."""
    return _EMPHASIS.sub("", text.translate(_FULL_WIDTH))


def read_committed(text, options):
    """(letters, rule) of an answer with its reasoning removed."""
    masked, negated = mask_negations(text)
    if _RETRACTED.search(masked):
        return None, "conflict"
    listed = listed_options(masked) & set(options)
    lead = None if len(listed) >= 2 else leading_answer(masked, options)
    for rule, match in cue_matches(masked):
        letters, hedged = letters_of(match, masked, options)
        if hedged:
            return None, "hedge"
        if letters:
            if lead and lead[0] not in (None, letters) and not _CORRECTION.search(masked[lead[2] : match.start()]):
                return None, "conflict"  # "C. ...\nThe answer is E."
            return letters, "negated" if negated else rule
    if (match := _ONLY.match(masked)) and (letters := letters_of(match, masked, options)[0]):
        return letters, "only-letters"
    if len(listed) >= 2:
        return None, "option-list"
    if lead:
        return (None, "hedge") if lead[1] else (lead[0], "leading")
    return None, "negated" if negated else "none"


def listed_options(text):
    """The options a reply repeats: one per line (`A. ...`), or in order on one line (`A、高血压 B、糖尿病 ...`)."""
    listed = {match.group("l") for match in _OPTION_LINE.finditer(text)}
    for line in text.splitlines():
        letters = [match.group("l") for match in _INLINE_OPTION.finditer(line)]
        if len(letters) >= 2 and "".join(letters) in ALL_LETTERS:  # "A. x B. y", never "C. x. The answer is E."
            listed.update(letters)
    return listed


def leading_answer(text, options):
    """(letters, hedged, end) of the first answer form at the start of `text`, or None."""
    for pattern in _LEADING:
        if match := pattern.match(text):
            letters, hedged = letters_of(match, text, options)
            if hedged or letters:
                return letters, hedged, match.end("run")
    return None


def mask_negations(text):
    """The text with every negated letter replaced by a mark that is never read, and whether there was one."""
    negated = False
    for pattern in _NEGATED:
        spans = [match.span("l") for match in pattern.finditer(text)]
        for start, end in reversed(spans):
            text = text[:start] + _MASK + text[end:]
        negated = negated or bool(spans)
    return text, negated


def cue_matches(text):
    """(rule, match) of every cue followed by letters, in the order they appear (a letter-cue by its letter)."""
    found = [(m.start(), "cue", m) for pattern in (_CUE, _CLAUSE_CUE) for m in pattern.finditer(text)]
    found += [
        (m.start("run"), "letter-cue", m)
        for m in _LETTER_CUE.finditer(text)
        if not _NOT_A_LETTER_CUE.search(text[: m.start("run")])
    ]
    return [(rule, match) for _, rule, match in sorted(found, key=lambda entry: entry[0])]


def letters_of(match, text, options):
    """(sorted option letters of the match's run or None, whether another letter follows it after "or")."""
    hedged = bool(_HEDGE.match(text[match.end("run") :]))
    run = match.group("run")
    if re.fullmatch(r"[A-Z]{2,}", run) and (len(set(run)) < len(run) or not set(run) <= set(options)):
        return None, hedged  # a word in capitals ("ACEI", "DNA"), not a set of options
    letters = {c.upper() for c in re.sub(rf"{_SEP}|\s|\band\b", "", run)} & set(options)
    return ("".join(sorted(letters)) if letters else None), hedged
