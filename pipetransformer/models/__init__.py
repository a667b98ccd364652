"""Model adapters: a Hugging Face encoder seen as embed -> blocks -> head (see base.py).

catalog.py reads config.json only (no torch), for checks before any worker starts;
loading.py builds the model; text.py and vision.py map each family's layers to units."""
