"""What the tests share: launching ranks (`launching`), k2m-train behind a fault plan
(`k2m_train_faults`), counting bytes at the collectives (`comm_bytes`) and saved for backward
(`saved_bytes`), random Hugging Face models (`hf_models`), the data tests' corpora and datasets
(`data_helpers`), and a Slurm cluster on loopback (`slurm_cluster`). tests/conftest.py puts
tests/ on sys.path, so a test imports `harness.launching`; a worker started as a script puts
tests/ there itself."""
