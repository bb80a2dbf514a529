"""A tiny, randomly initialised LLaVA for offline tests and notebooks (no download, a few seconds on a CPU).

``build_tiny_llava(folder)`` writes a complete model folder: a tiny CLIP vision tower and a tiny Llama, a
byte-level BPE tokenizer trained on the spot with ``tokenizers``, a ``CLIPImageProcessor`` and a
``LlavaProcessor`` with a chat template. It loads back with ``local_files_only=True`` through the same
``AutoModelForImageTextToText``/``AutoProcessor`` code path as a real model. Its weights are random, so its
*text* is noise: use it to test plumbing, schemas, constrained decoding and parsing, never wording.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _corpus() -> list[str]:
    labels = "neutral happiness surprise sadness anger disgust fear contempt"
    aus = " ".join(f"AU{n:02d}" for n in range(1, 46))
    return [
        '{"faces":[{"index":0,"distribution":{"neutral":0.1,"happiness":0.9},"cues":[{"cue":"smile",'
        '"source":"face","au":"AU12","supports":"happiness","weight":0.5}],"rationale":"The face smiles."}]}',
        labels, aus, "face scene body text null true false 0123456789 .,:;{}[]\"' -_",
        "You read emotions of faces in context. Face 1 left center right quality pose yaw pitch roll.",
        "Action units expression model context image answer JSON only with the schema.",
    ] * 20


def build_tiny_llava(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random LLaVA to ``folder`` and return the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.padding_side = "left"
    image_token_id = fast.convert_tokens_to_ids("<image>")

    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                       pad_token_id=fast.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
