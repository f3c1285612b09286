"""Models: GGUF conversion and its shared cache (`gguf`), loading the policy, the reference and the tokenizer
(`loading`), the frozen reference (`reference`), and the tokens a completion ends with (`tokens`)."""
