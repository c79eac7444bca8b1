"""Weight packing (Deep Compression, post-training): pruning, k-means weight sharing,
relative-index sparse storage, Huffman coding and the .onnxz container."""
