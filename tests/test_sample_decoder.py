"""`python -m deranj.sample` with two Hugging Face decoder-only directories: a random tiny
Llama pair with a word-level tokenizer.json built here (id 0 is the real token "!"),
prompts as transformers' tokenizer and chat template make them, greedy samples at lam 0
and 1 equal to each model's `generate`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch.set_num_threads(1)

from deranj import sample  # noqa: E402
from deranj.models import base  # noqa: E402
from deranj.models import loading  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ["!"] + SPECIAL + [f"w{i}" for i in range(58)]  # "!" = 0, <s> = 1, </s> = 2
EOS = 2
TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> "
            "{{ message['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>"
            "{% endif %}")
PROMPTS = ["w3 w7 ! w9", "w12", "! w40 w41 w42 w5 w6"]
NEW_TOKENS = 8


def _write_tokenizer(directory, chat_template=TEMPLATE):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(SPECIAL)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>"}
  if chat_template:
    settings["chat_template"] = chat_template
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(settings, f)


def _llama(directory, seed):
  config = transformers.LlamaConfig(
      vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, bos_token_id=1,
      eos_token_id=EOS, tie_word_embeddings=seed % 2 == 0)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  # "!" (id 0) takes the place of the token the model emits most: 1.05 x its head row.
  with torch.no_grad():
    prompts = torch.tensor([[1, 4, 9, 13, 0, 5], [1, 4, 20, 30, 40, 5]])
    common = int(torch.mode(model.generate(input_ids=prompts, do_sample=False,
                                           max_new_tokens=NEW_TOKENS)[:, 6:].flatten()).values)
    head = model.get_output_embeddings().weight
    head[0] = 1.05 * head[common]
  model.save_pretrained(directory)
  _write_tokenizer(directory)
  return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(reference dir, its model, aligned dir, its model)."""
  root = tmp_path_factory.mktemp("hf_pair")
  ref_dir, al_dir = str(root / "sft"), str(root / "dpo")
  return ref_dir, _llama(ref_dir, 0), al_dir, _llama(al_dir, 1)


def _run(tmp_path, pair, chat_template, **config):
  ref_dir, _, al_dir, _ = pair
  inp = tmp_path / "in.jsonl"
  inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  out = tmp_path / "out.jsonl"
  settings = dict(aligned_checkpoint=al_dir, reference_checkpoint=ref_dir,
                  max_input_length=16, max_decode_len=NEW_TOKENS, temperature=0.0,
                  batch_size=2)
  settings.update(config)
  count = sample.run(sample.SampleConfig(**settings), sample.Method(values=(0.0, 1.0)),
                     str(inp), str(out), 0, chat_template=chat_template)
  assert count == 2 * len(PROMPTS)
  return [json.loads(line) for line in out.read_text().splitlines()]


def _generate(model, ids, eos=EOS):
  with torch.no_grad():
    new = model.generate(input_ids=torch.tensor([ids]), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                         pad_token_id=eos)[0, len(ids):].tolist()
  return new[:new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("chat_template", [True, False])
def test_lam_zero_and_one_are_each_models_generate(tmp_path, pair, chat_template):
  ref_dir, ref_model, _, al_model = pair
  theirs = transformers.AutoTokenizer.from_pretrained(ref_dir)
  records = _run(tmp_path, pair, chat_template)
  emitted = []
  for record in records:
    prompt = PROMPTS[record["prompt_index"]]
    if chat_template:
      ids = theirs.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=True)["input_ids"]
      assert ids[-1] == WORDS.index("<|assistant|>")
    else:
      ids = theirs(prompt)["input_ids"]
      assert ids[0] == 1  # BOS from the tokenizer's post-processor; no EOS appended
    new = _generate(ref_model if record["lam"] == 0.0 else al_model, ids)
    emitted += new
    assert record["length"] == len(new), (record, new)
    assert record["text"] == theirs.decode([t for t in new if t != EOS],
                                           skip_special_tokens=True)
  if chat_template:  # the models were tuned to emit "!" (id 0) after these prompts
    assert 0 in emitted


def test_eos_setting_and_truncation_keep_the_generation_prompt(tmp_path, pair):
  """SampleConfig.eos_id overrides the tokenizer's eos_token; a long chat prompt keeps
  its end (the generation prompt)."""
  _, ref_model, al_dir, _ = pair
  tok = sample.HFTokenizer(al_dir, None, chat_template=True)
  assert tok.eos_id == EOS  # tokenizer_config.json's eos_token
  ids, length = tok.encode_prompt(PROMPTS[2], 5)
  assert length == 9  # <s> <|user|> and the 6 words, <|assistant|>
  assert ids == [WORDS.index(w) for w in ["w41", "w42", "w5", "w6", "<|assistant|>"]]
  # The reference's greedy continuation of prompt 0, ended at its second token.
  prompt = tok.encode_prompt(PROMPTS[0], 16)[0]
  second = _generate(ref_model, prompt)[1]
  records = _run(tmp_path, pair, True, eos_id=second)
  lam0 = [r for r in records if r["lam"] == 0.0]
  assert lam0[0]["length"] == 2
  for record in lam0:
    ids, _ = tok.encode_prompt(PROMPTS[record["prompt_index"]], 16)
    assert record["length"] == len(_generate(ref_model, ids, eos=second))


def test_hf_decoder_dirs_load_as_no_pad_models(pair):
  model, params = loading.load_model(pair[0], dropout_rate=0.0)
  assert isinstance(model, base.DecoderOnlyModel) and model.pad_id == base.NO_PAD
  assert model.config.vocab_size == len(WORDS)


def test_chat_template_errors_are_one_line(tmp_path, pair):
  no_template = tmp_path / "no_template"
  _llama(str(no_template), 2)
  _write_tokenizer(str(no_template), chat_template=None)
  with pytest.raises(sample.SampleError, match="no_template/tokenizer_config.json has no "
                     "chat_template"):
    _run(tmp_path, (pair[0], None, str(no_template), None), True)
  (no_template / "tokenizer.json").unlink()
  with pytest.raises(sample.SampleError, match="without tokenizer.json"):
    _run(tmp_path, (pair[0], None, str(no_template), None), False)
  with pytest.raises(sample.SampleError, match="--chat_template applies a Hugging Face"):
    _run(tmp_path, ("tiny", None, "tiny", None), True)
  assert not (tmp_path / "out.jsonl").exists()


def test_command_line_chat_template(tmp_path, pair):
  ref_dir, _, al_dir, _ = pair
  inp = tmp_path / "in.jsonl"
  inp.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "deranj.sample", "--lam=0.5", "--chat_template",
         f"--input={inp}", f"--output={out}", f"--gin.SampleConfig.aligned_checkpoint='{al_dir}'",
         f"--gin.SampleConfig.reference_checkpoint='{ref_dir}'",
         "--gin.SampleConfig.max_decode_len=4"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  (record,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert record["lam"] == 0.5 and 1 <= record["length"] <= 4
  assert np.isfinite(record["logq"]) and np.isfinite(record["kl_ref"])
