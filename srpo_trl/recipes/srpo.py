"""Train a model with SRPO (Safety-aware Reasoning Path Optimization) from a recipe.

Reads a recipe YAML (script, training, model and dataset arguments, parsed the TRL way; any field
can be overridden on the command line), checks that the model and data it names exist, loads the
step pairs and the model (causal LM or vision-language model, LoRA / QLoRA or full), trains
`SRPOTrainer` and saves the adapter or full model with its processor and a model card into
`output_dir`. The code lives in `srpo_trl/recipe_runner.py`; `srpo-trl train` runs the same code.

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \
        recipes/srpo.py --config recipes/qwen2.5-vl-7b-instruct/srpo/config_lora.yaml

    # one GPU, a field overridden on the command line:
    python recipes/srpo.py --config recipes/qwen2.5-7b-instruct/srpo/config_lora.yaml --learning_rate 1e-5

See docs/recipes.md for the recipes, launch configs, hardware assumptions and logging.
"""

import sys

from srpo_trl.recipe_runner import main


if __name__ == "__main__":
    sys.exit(main())
