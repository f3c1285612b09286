"""Preference pairs and prompts: reading sources (`files`), row formats and validation (`rows`), tokenization
(`encoding`), batches (`batches`), and which sources a run reads (`sources`)."""
