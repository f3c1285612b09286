"""The bundled "reviews" task: its data files beside this module and its gold judge (`judge`)."""
