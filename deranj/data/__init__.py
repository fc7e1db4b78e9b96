"""Data: embedded corpora, the tokenizer, seqio tasks and deterministic batches.

Modules (only `tasks` and `pipeline` import TensorFlow/seqio):
  files           JSON-lines reading with line-numbered errors, atomic writes
  corpora         real news-style (document, summary) pairs from gensim's test data
  synthetic       seeded generator of news-like documents with one-sentence summaries
  preferences     the (prompt, chosen, rejected) record and its JSON-lines files
  tldr            OpenAI TL;DR files: prompt format, SFT posts, comparisons
  tokenizer       the shipped SentencePiece model (PAD=0, EOS=1, UNK=2, sentinels on top)
  span_corruption T5's span-corruption objective in numpy (pretraining)
  tasks           seqio task registrations (xsum, tldr_sft, tldr_preferences, ...)
  pipeline        task split -> fixed-length numpy arrays -> batch_at(step)
"""
