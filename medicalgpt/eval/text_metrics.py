"""ROUGE-L and BLEU of generated answers against reference answers, on characters for Chinese and words for English.

    rouge, bleu, corpus = text_scores(["多喝水，多休息。"], ["多喝水，注意休息。"])

Tokens (`text_tokens`): each Chinese character is a token, other runs of letters and digits are words, lower-cased;
punctuation and spaces are dropped, so mixed Chinese-English text is scored on both. ROUGE-L is rouge-score's
longest-common-subsequence F1 on those tokens; BLEU is sacrebleu's, with its "zh" tokenizer (characters for Chinese,
13a for the rest) when a reference has Chinese characters, else "13a" (words, case-sensitive, as sacrebleu reports
it). Both on a 0-100 scale. Per item: ROUGE-L F1 and sentence BLEU; for the file: their mean and corpus BLEU.
"""

import functools
import re

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
CJK = re.compile(f"[{CJK_RANGES}]")
TEXT_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")


def is_chinese(text):
    return CJK.search(text) is not None


def text_tokens(text):
    """Chinese characters one by one, other words whole, lower-cased; punctuation and spaces dropped."""
    return TEXT_TOKEN.findall(text.lower())


class _RougeTokenizer:  # the interface rouge_score.RougeScorer takes
    def tokenize(self, text):
        return text_tokens(text)


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


def rouge_l(prediction, reference):
    """ROUGE-L F1 (0-100) of one prediction against its reference, on text_tokens."""
    return 100 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def bleu_tokenize(references):
    return "zh" if any(is_chinese(text) for text in references) else "13a"


def text_scores(predictions, references):
    """(ROUGE-L F1 and sentence BLEU per item, corpus metrics), all 0-100."""
    import sacrebleu

    tokenize = bleu_tokenize(references)
    rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
    bleu = [sacrebleu.sentence_bleu(p, [r], tokenize=tokenize).score for p, r in zip(predictions, references)]
    corpus = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score
    return rouge, bleu, {"rouge_l": sum(rouge) / len(rouge), "bleu": corpus, "bleu_tokenize": tokenize}
