"""Print the README's table of weights per rank in each format (llama3.checkpoint.quantized).

    python scripts/quantized_memory_table.py
"""

from llama3.checkpoint.quantized import memory_table

if __name__ == "__main__":
    print(memory_table())
