"""Triton kernels shared by the delta-rule family (DeltaNet, Gated DeltaNet) and Mamba2's SSD.

``chunk``: chunkwise forward/backward of the gated delta rule and of gated linear attention (SSD),
``recurrent``: the fused token-by-token kernel for decoding. Import only where Triton is available.
"""
