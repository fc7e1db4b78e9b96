"""Rebuilds deranj/assets/spm.model: SentencePiece unigram on the embedded prose.

Usage: python scripts/build_tokenizer.py [--vocab_size 4000] [--output PATH]

Trains on the train split of the embedded corpora (deranj.data.corpora) plus synthetic
training documents, with T5's ids (PAD=0, EOS=1, UNK=2, no BOS), then appends
NUM_SENTINELS `<extra_id_i>` pieces at the top of the vocabulary in seqio's order, so
the shipped model has vocab_size + NUM_SENTINELS ids. Takes a few seconds.
"""
import argparse
import io
import os
import sys
import time

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deranj.data import corpora  # pylint: disable=g-import-not-at-top
from deranj.data import files
from deranj.data import synthetic
from deranj.data import tokenizer

NUM_SYNTHETIC = 2000


def training_sentences() -> list[str]:
  texts = corpora.prose("train")
  for ex in synthetic.examples(NUM_SYNTHETIC, seed=0, split="train"):
    texts += [ex.document, ex.summary]
  return corpora.sentences(texts)


def train(sentences: list[str], vocab_size: int) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, model_type="unigram",
      vocab_size=vocab_size, pad_id=tokenizer.PAD_ID, eos_id=tokenizer.EOS_ID,
      unk_id=tokenizer.UNK_ID, bos_id=-1, character_coverage=0.9995,
      normalization_rule_name="nmt_nfkc", input_sentence_size=0,
      shuffle_input_sentence=False, num_threads=2, minloglevel=2)
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  # seqio's layout: extra_id_{N-1} first, extra_id_0 last (the top id).
  for i in reversed(range(tokenizer.NUM_SENTINELS)):
    proto.pieces.add(piece=f"▁<extra_id_{i}>", score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vocab_size", type=int, default=4000,
                      help="pieces before sentinels (4000 + 96 sentinels = 4096 ids)")
  parser.add_argument("--output", default=tokenizer.MODEL_PATH)
  args = parser.parse_args()
  start = time.time()
  sentences = training_sentences()
  model = train(sentences, args.vocab_size)
  files.write_bytes_atomic(args.output, model)
  sp = spm.SentencePieceProcessor(model_proto=model)
  print(f"wrote {args.output}: {sp.get_piece_size()} ids ({args.vocab_size} pieces + "
        f"{tokenizer.NUM_SENTINELS} sentinels) from {len(sentences)} sentences in "
        f"{time.time() - start:.1f}s")


if __name__ == "__main__":
  main()
