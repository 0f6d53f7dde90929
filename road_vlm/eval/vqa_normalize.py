"""The EvalAI / VQA answer normalisation used by TextVQA's scorer (LLaVA's m4c_evaluator.py),
reimplemented from its definition, quirks included:

* ``,`` and ``?`` are deleted before anything else, so "1,000" becomes "1000" and the later
  digit-comma-digit test can never fire (kept anyway, as written);
* punctuation is deleted when the text has it next to a space, otherwise replaced by a space
  ("coca-cola" -> "coca cola"); the test looks at the text before the loop, not the running result;
* the period regex was meant as "not preceded by a digit" but is written as a lookahead, so it
  deletes every '.' not followed by a digit, and ``re.UNICODE`` lands in ``count``: at most 32;
* number words zero..ten (and "none") become digits, articles are dropped, contractions fixed.
"""

from __future__ import annotations

import re

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_MAX_REPLACEMENTS = int(re.UNICODE)  # 32: the original passes re.UNICODE as `count`
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Misspelt contraction -> canonical form (the standard VQA evaluation table).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _word_tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        # Deliberately tests the text as it was *before* this loop, like the original.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REPLACEMENTS)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """EvalAIAnswerProcessor: the normalisation applied to predictions and to every GT answer."""
    text = _word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digits_and_articles(text)


def vqa_soft_scores(gt_answers: list[str]) -> dict[str, float]:
    """Score of each distinct normalised GT answer: over the 10 leave-one-out subsets of 9
    annotators, min(1, matches/3), averaged (TextVQAAccuracyEvaluator)."""
    answers = [normalize_answer(a) for a in gt_answers]
    if len(answers) != 10:
        raise ValueError(f"VQA accuracy needs exactly 10 ground-truth answers, got {len(answers)}")
    scores = {}
    for candidate in set(answers):
        total = 0.0
        for left_out in range(10):
            matches = sum(1 for j, a in enumerate(answers) if j != left_out and a == candidate)
            total += min(1.0, matches / 3)
        scores[candidate] = total / 10
    return scores


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Soft VQA accuracy (0..1) of one prediction."""
    return vqa_soft_scores(gt_answers).get(normalize_answer(prediction), 0.0)
