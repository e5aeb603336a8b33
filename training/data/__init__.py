"""The Genesis data pipeline: embedded corpus, mixture recipes, renderers, shard preparation and
the packed, exactly resumable training loader.

    genesis data prepare --mixture training/mixtures/embedded.yaml --tokenizer TOK --output DATA
"""
