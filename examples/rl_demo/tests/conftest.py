pytest_plugins = ["skyrl_backends.testing.fixtures"]  # model_dir, lora_dir, tokenizer
