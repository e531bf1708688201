"""`srpo-trl train` loads a vision-language model with gradient checkpointing on (the shipped VLM
recipes' setting). It passed `use_cache=False` to `from_pretrained`, which Qwen2.5-VL's class does not
take (TypeError before any training); found by rehearsing tests/gpu/ on CPU (issue 11)."""

from types import SimpleNamespace

from trl import ModelConfig

from srpo_trl.recipe_runner import load_model
from srpo_trl.tiny import tiny_qwen2_5_vl


def test_vlm_loads_with_gradient_checkpointing_and_no_cache(tmp_path):
    model, processor = tiny_qwen2_5_vl(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    training_args = SimpleNamespace(gradient_checkpointing=True, trust_remote_code=False, model_init_kwargs=None)
    loaded = load_model(
        str(tmp_path), True, ModelConfig(model_name_or_path=str(tmp_path), dtype="float32"), training_args
    )
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert loaded.config.get_text_config().use_cache is False
