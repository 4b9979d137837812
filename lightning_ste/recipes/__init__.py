"""What the YAML recipes under ``recipes/`` need: the ``lightning-ste`` command (:mod:`.cli`), the recipe
models (:mod:`.models`), data modules (:mod:`.data`) and the YLZ19 figure (:mod:`.figures`)."""
