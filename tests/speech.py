"""Test helpers for speech: sentences spoken by espeak-ng at known times in a generated video,
the small English Vosk model shipped inside the `videogrep` wheel, a tiny random Whisper, and
the word error rate."""

import importlib.util
import json
import os
import shutil
import subprocess
import wave

import av
import numpy as np

# Spoken one after the other, each starting at its offset (s) in the audio track.
SENTENCES = [
    (1.0, "the quick brown fox jumps over the lazy dog"),
    (6.0, "we mix the flour with water and salt"),
    (11.0, "then we bake the bread for one hour"),
]
DURATION = 16.0
RATE = 22050  # espeak-ng's output rate; the converter resamples to 16 kHz
# Amplitude above which a sample counts as speech when finding where a sentence starts.
_ONSET = 0.01


def have_espeak() -> bool:
  return shutil.which("espeak-ng") is not None


def speak(text: str) -> np.ndarray:
  """espeak-ng's rendering of `text`: float32 mono at RATE."""
  wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text],
                       check=True, capture_output=True).stdout
  import io  # pylint: disable=g-import-not-at-top
  with wave.open(io.BytesIO(wav)) as w:
    assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
    return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def speech_track(sentences=SENTENCES, duration=DURATION):
  """(samples at RATE, [(text, spoken start s, spoken end s)]): each sentence at its offset,
  silence between; the spoken times are where its samples first and last exceed _ONSET."""
  track = np.zeros(round(duration * RATE), np.float32)
  spoken = []
  for offset, text in sentences:
    samples = speak(text)
    at = round(offset * RATE)
    assert at + samples.size <= track.size, text
    track[at:at + samples.size] = samples
    loud = np.flatnonzero(np.abs(samples) > _ONSET)
    spoken.append((text, offset + loud[0] / RATE, offset + loud[-1] / RATE))
  return track, spoken


def write_video(path, audio=None, seconds=DURATION, audio_codec="aac"):
  """A 64x48 grey video at 10 fps, with `audio` (float32 at RATE) as its sound track."""
  with av.open(str(path), "w") as container:
    video = container.add_stream("libx264", rate=10, options={"preset": "ultrafast"})
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    sound = None
    if audio is not None:
      sound = container.add_stream(audio_codec, rate=RATE, layout="mono")
    frame_size = 1024
    audio_done = 0
    for n in range(round(seconds * 10)):
      img = np.full((48, 64, 3), (n * 7) % 256, np.uint8)
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = n
      container.mux(video.encode(frame))
      # Interleave: the audio up to this video frame's time.
      while sound is not None and audio_done < min(audio.size, round((n + 1) / 10 * RATE)):
        chunk = audio[audio_done:audio_done + frame_size]
        chunk = np.pad(chunk, (0, frame_size - chunk.size))
        af = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
        af.sample_rate, af.pts = RATE, audio_done
        container.mux(sound.encode(af))
        audio_done += frame_size
    container.mux(video.encode())
    if sound is not None:
      container.mux(sound.encode())
  return str(path)


def vosk_model() -> str | None:
  """The small US English Vosk model inside the installed `videogrep` wheel, if any (found by
  path; videogrep itself is not imported: it needs moviepy)."""
  spec = importlib.util.find_spec("videogrep")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "model")
  return path if os.path.isfile(os.path.join(path, "am", "final.mdl")) else None


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
  """Word-level edit distance (substitutions, insertions, deletions) / len(reference)."""
  prev = list(range(len(hypothesis) + 1))
  for i, r in enumerate(reference, 1):
    cur = [i] + [0] * len(hypothesis)
    for j, h in enumerate(hypothesis, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return prev[-1] / max(len(reference), 1)


def normalise(words) -> list[str]:
  return [w.lower().strip(".,!?;:\"'") for w in words if w.strip(".,!?;:\"'")]


def tiny_whisper(directory: str, seed: int = 0) -> str:
  """A randomly initialised Whisper (2 layers, width 64) converted to CTranslate2 in
  `directory`/ct2, built without any download.

  Its tokenizer is made here: the 256 byte-level symbols, a few hundred whole words (so that
  the random model's output is mostly words), the empty token by which CTranslate2 tells a
  multilingual Whisper, and Whisper's special tokens in Whisper's order; the timestamp tokens
  are added by the converter. Its words are noise: it checks plumbing, not accuracy.
  """
  import ctranslate2  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from faster_whisper.tokenizer import _LANGUAGE_CODES  # pylint: disable=g-import-not-at-top
  hf = os.path.join(directory, "hf")
  os.makedirs(hf, exist_ok=True)
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  for word in sorted({w for _, s in SENTENCES for w in s.split()} |
                     {f"word{i}" for i in range(300)}):
    vocab["\u0120" + word] = len(vocab)  # byte-level "Ġ" = a leading space
  vocab[""] = len(vocab)
  languages = ["en"] + [c for c in _LANGUAGE_CODES if c != "en"]
  specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in languages] +
              ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
               "<|nospeech|>", "<|notimestamps|>"])
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(specials)
  tok.save(os.path.join(hf, "tokenizer.json"))
  ids = tok.get_vocab()
  transformers.WhisperTokenizerFast(
      tokenizer_file=os.path.join(hf, "tokenizer.json"), bos_token="<|endoftext|>",
      eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(hf)
  torch.manual_seed(seed)
  n = tok.get_vocab_size()
  config = transformers.WhisperConfig(
      vocab_size=n + 1501, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
      decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
      pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
      eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"])
  model = transformers.WhisperForConditionalGeneration(config)
  generation = transformers.GenerationConfig(
      decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
      no_timestamps_token_id=ids["<|notimestamps|>"], suppress_tokens=[],
      begin_suppress_tokens=[ids["<|endoftext|>"]])
  generation.lang_to_id = {f"<|{c}|>": ids[f"<|{c}|>"] for c in languages}
  model.generation_config = generation
  model.save_pretrained(hf)
  out = os.path.join(directory, "ct2")
  ctranslate2.converters.TransformersConverter(hf, copy_files=["tokenizer.json"]).convert(
      out, force=True)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["lang_ids"], "the converter found no language tokens"
  return out
