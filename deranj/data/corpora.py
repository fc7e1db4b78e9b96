"""Real English prose that ships inside gensim's wheel, as XSum-style summarisation pairs.

XSum takes a BBC article's introductory sentence as the summary and the rest as the
document. We do the same with two sources in `gensim/test/test_data/`:
  * the Lee corpus (Lee, Pincombe & Welsh, 2005): ABC news articles, one per line, in
    `lee_background.cor` (300) and `lee.cor` (50);
  * a shortened English Wikipedia dump (~200 pages, ~100 of them articles rather than
    redirects); the lead sentence is the summary, the following prose the document.

Each article lands in train/validation/test by a hash of its identity (the text for
Lee articles, the title for Wikipedia pages), so the split is fixed and does not depend
on file order. `articles(split)` gives whole articles (tokenizer and pretraining text),
`news_pairs(split)` the (document, summary) pairs built from the same split, and
`news_preference_pairs(split)` (prompt, chosen, rejected) pairs from those: the lead
sentence against a seeded shuffle of its words.

No TensorFlow here; gensim is imported only to parse the Wikipedia dump.
"""
from __future__ import annotations

import bz2
import dataclasses
import functools
import hashlib
import os
import re
from typing import Optional, Sequence

import numpy as np


from deranj.data import files
from deranj.data import preferences

SPLITS = ("train", "validation", "test")
# Percent of articles per split, in SPLITS order.
SPLIT_PERCENT = (80, 10, 10)

LEE_FILES = ("lee_background.cor", "lee.cor")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Roughly XSum's mean document length (431 words).
MAX_DOCUMENT_WORDS = 400
MIN_DOCUMENT_WORDS = 30
MIN_SUMMARY_WORDS = 5
MAX_SUMMARY_WORDS = 80


@dataclasses.dataclass(frozen=True)
class SummaryExample:
  """One summarisation pair; `source` says where it came from (file:line, page title)."""
  document: str
  summary: str
  source: str


@dataclasses.dataclass(frozen=True)
class Article:
  """A whole article: paragraphs joined by newlines."""
  text: str
  source: str
  split_key: str  # what the split hash is taken of


# ----------------------------------------------------------------------------- splits


def split_of(key: str) -> str:
  """'train' | 'validation' | 'test' for an article identity, fixed by sha256."""
  bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
  bound = 0
  for split, percent in zip(SPLITS, SPLIT_PERCENT):
    bound += percent
    if bucket < bound:
      return split
  raise AssertionError("SPLIT_PERCENT must sum to 100")


def check_split(split: Optional[str]) -> None:
  if split is not None and split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS} (or None for all).")


# ----------------------------------------------------------------------------- sentences

# Words that end in a period without ending a sentence.
_ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt cmdr adm gov sen rep pres rev hon
inc ltd co corp bros no nos vs etc approx al jan feb mar apr jun jul aug sep sept oct nov
dec e.g i.e u.s u.k u.n a.m p.m c ca fig vol pp ed eds
""".split())

_SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
  """Splits prose into sentences at . ! ? followed by a capital, minding abbreviations."""
  sentences, start = [], 0
  for match in _SENTENCE_END.finditer(text):
    before = text[start:match.start() + 1]
    last_word = before.rsplit(None, 1)[-1].lower().rstrip(".").strip("\"'(")
    # Initials ("John F. Kennedy") and abbreviations do not end sentences.
    if before.endswith(".") and (last_word in _ABBREVIATIONS or
                                 (len(last_word) == 1 and last_word.isalpha())):
      continue
    sentences.append(text[start:match.end()].strip())
    start = match.end()
  tail = text[start:].strip()
  if tail:
    sentences.append(tail)
  return sentences


def _num_words(text: str) -> int:
  return len(text.split())


# ----------------------------------------------------------------------------- sources


def gensim_test_data_dir() -> str:
  """gensim's `test/test_data` directory (shipped in its wheel)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise files.DataError("The embedded corpora come from the gensim package, which is not "
                          "installed: pip install gensim.")
  directory = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
  for name in (*LEE_FILES, WIKI_FILE):
    files.require_file(os.path.join(directory, name), what="gensim test data")
  return directory


@functools.lru_cache(maxsize=None)
def lee_articles() -> tuple[Article, ...]:
  """The Lee corpus: one ABC news article per line (latin-1, as the files are)."""
  directory = gensim_test_data_dir()
  out = []
  for name in LEE_FILES:
    with open(os.path.join(directory, name), encoding="latin-1") as f:
      for line_number, line in enumerate(f, start=1):
        text = " ".join(line.split())
        if text:
          out.append(Article(text=text, source=f"{name}:{line_number}", split_key="lee:" + text))
  return tuple(out)


_SKIP_TITLE = re.compile(r"\(disambiguation\)$|^List of ")
# Sections after which a page holds no more prose.
_END_SECTIONS = re.compile(
    r"^=+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources|"
    r"Citations|Footnotes)\s*=+\s*$", re.IGNORECASE)


def clean_wiki_paragraphs(wikitext: str) -> list[str]:
  """Prose paragraphs of a page: markup stripped, headings/lists/tables dropped.

  The lead starts at the first paragraph with the bold title ('''...'''), which skips
  image captions left at the top by gensim's `filter_wiki`.
  """
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  text = wikicorpus.filter_wiki(wikitext)
  paragraphs, lead_found = [], False
  for line in text.split("\n"):
    line = line.strip()
    if _END_SECTIONS.match(line):
      break
    if not line or line[0] in "=*#:;|{}!" or line.lower().startswith(("thumb", "image:")):
      continue
    if not lead_found:
      if "'''" not in line:
        continue
      lead_found = True
    line = line.replace("'''", "").replace("''", "")
    line = re.sub(r"\(\s*[;,]?\s*\)", "", line)  # "( )" left by removed templates
    line = re.sub(r"\(\s*[;,]\s*", "(", line)
    line = re.sub(r"\s+([,.;:])", r"\1", line)
    line = " ".join(line.split())
    if _num_words(line) >= 8:
      paragraphs.append(line)
  return paragraphs


@functools.lru_cache(maxsize=None)
def wikipedia_articles() -> tuple[Article, ...]:
  """Article pages of the shortened Wikipedia dump (redirects, lists, disambiguations
  skipped)."""
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  path = os.path.join(gensim_test_data_dir(), WIKI_FILE)
  out = []
  with bz2.open(path, "rb") as f:
    for title, wikitext, _ in wikicorpus.extract_pages(f):
      if wikitext.lstrip().lower().startswith("#redirect") or _SKIP_TITLE.search(title):
        continue
      paragraphs = clean_wiki_paragraphs(wikitext)
      if paragraphs:
        out.append(Article(text="\n".join(paragraphs), source=f"enwiki:{title}",
                           split_key="enwiki:" + title))
  return tuple(out)


def articles(split: Optional[str] = None) -> list[Article]:
  """All embedded articles (Lee, then Wikipedia), deduplicated, optionally one split."""
  check_split(split)
  seen, out = set(), []
  for article in (*lee_articles(), *wikipedia_articles()):
    if article.text in seen:
      continue
    seen.add(article.text)
    if split is None or split_of(article.split_key) == split:
      out.append(article)
  return out


# ----------------------------------------------------------------------------- pairs


def lead_pair(article: Article) -> Optional[SummaryExample]:
  """First sentence -> summary, the following sentences (up to ~400 words) -> document.

  None when the article is too short or its first sentence is not summary-like.
  """
  paragraphs = [split_sentences(p) for p in article.text.split("\n")]
  summary = paragraphs[0][0]
  paragraphs[0] = paragraphs[0][1:]
  document_paragraphs, words = [], 0
  for paragraph in paragraphs:
    kept = []
    for sentence in paragraph:
      if words + _num_words(sentence) > MAX_DOCUMENT_WORDS and (kept or document_paragraphs):
        break
      kept.append(sentence)
      words += _num_words(sentence)
    if kept:
      document_paragraphs.append(" ".join(kept))
    if len(kept) < len(paragraph):
      break
  document = "\n".join(document_paragraphs)
  if not (MIN_SUMMARY_WORDS <= _num_words(summary) <= MAX_SUMMARY_WORDS and
          _num_words(document) >= MIN_DOCUMENT_WORDS):
    return None
  return SummaryExample(document=document, summary=summary, source=article.source)


def news_pairs(split: str) -> list[SummaryExample]:
  """The `embedded_news` pairs of one split, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}.")
  return [p for p in map(lead_pair, articles(split)) if p is not None]


# How `news_preference_pairs` makes the rejected summary from the chosen one.
CORRUPTIONS = ("reverse_letters", "shuffle_words")
_WORD_CHARACTERS = re.compile(r"\w+")


def reverse_letters(text: str) -> str:
  """Every run of letters and digits spelled backwards; spaces and punctuation stay.

  "Argentina's crisis deepened." -> "anitnegrA's sisirc denepeed."
  """
  return _WORD_CHARACTERS.sub(lambda m: m.group(0)[::-1], text)


def shuffle_words(text: str, key: str, seed: int = 0) -> str:
  """`text`'s words (whitespace-separated, punctuation attached) in a seeded order that
  differs from the original.

  The order is a function of (seed, key) alone (numpy's PCG64), not of the process or
  the Python version. A text whose words cannot be reordered into a different string
  (one word, or all words equal) is returned unchanged.
  """
  words = text.split()
  digest = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
  rng = np.random.default_rng([seed, digest])
  for _ in range(100):
    shuffled = " ".join(words[i] for i in rng.permutation(len(words)))
    if shuffled != " ".join(words):
      return shuffled
  return text


def news_preference_pairs(split: str, corruption: str = "reverse_letters",
                          seed: int = 0) -> list[preferences.PreferencePair]:
  """The `embedded_news_preferences` pairs of one split, in a fixed order: for each
  `news_pairs` example, prompt = the document, chosen = its lead sentence, rejected =
  that sentence corrupted. Pairs whose corruption changes nothing are left out.

  Corruptions:
    "reverse_letters"  every word spelled backwards (`reverse_letters`); the default.
    "shuffle_words"    the words in a random order seeded by (seed, the article's
                       source) (`shuffle_words`).

  Both keep the chosen summary's length in words and its content, so neither length
  nor overlap with the article can tell the two apart (the shortcuts real preference
  data invites); the rejected one is simply unreadable. Why reversal by default: the
  offline presets need a reward model that learns the preference in a short run, and
  the shipped tiny T5's encoder (3 layers, mean-pooled by `RewardModel`) reads
  spelling at once but word order only slowly. Measured on the smoke settings
  (32-token prompts, 16-token responses, batch 8): a linear probe on the frozen
  encoder's pooled features separates reversed pairs 95% of the time on the held-out
  split, shuffled ones 62-71%; fine-tuning reaches 93% held-out accuracy after 60
  steps on reversed pairs, and about 70% after 200 steps on shuffled ones (and no
  better than chance with whole, untruncated sentences, whose words are then the
  same on both sides). A shuffle asks for fluency, the better signal for a larger
  encoder; select it with the gin binding
  `embedded_news_preferences_settings.corruption = 'shuffle_words'`.
  """
  if corruption not in CORRUPTIONS:
    raise ValueError(f"corruption={corruption!r}: expected one of {CORRUPTIONS}.")
  pairs = []
  for p in news_pairs(split):
    if corruption == "reverse_letters":
      rejected = reverse_letters(p.summary)
    else:
      rejected = shuffle_words(p.summary, p.source, seed)
    if rejected != p.summary:
      pairs.append(preferences.PreferencePair(prompt=p.document, chosen=p.summary,
                                              rejected=rejected))
  return pairs


def prose(split: Optional[str] = None) -> list[str]:
  """Whole-article texts (tokenizer and pretraining input)."""
  return [a.text for a in articles(split)]


def sentences(texts: Sequence[str]) -> list[str]:
  """All sentences of `texts`, one per item (SentencePiece trains on lines)."""
  return [s for text in texts for para in text.split("\n") for s in split_sentences(para)]
