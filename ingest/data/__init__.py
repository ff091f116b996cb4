"""Data plane: decryption, the catalogue of families and schemas, the pipeline and the Kafka sink."""
