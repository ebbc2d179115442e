# 4 rows x 16 columns of u8 x s8 (k = 4 per step): per row one broadcast of 4 activations,
# 2 weight vectors (32 bytes each = 8 columns x 4 depths); vpmaddubsw -> vpmaddwd(ones) -> vpaddd
vpmaddubsw %ymm8, %ymm12, %ymm0
vpmaddwd %ymm15, %ymm0, %ymm0
vpaddd %ymm0, %ymm1, %ymm1
vpmaddubsw %ymm9, %ymm12, %ymm2
vpmaddwd %ymm15, %ymm2, %ymm2
vpaddd %ymm2, %ymm3, %ymm3
vpmaddubsw %ymm8, %ymm13, %ymm4
vpmaddwd %ymm15, %ymm4, %ymm4
vpaddd %ymm4, %ymm5, %ymm5
vpmaddubsw %ymm9, %ymm13, %ymm6
vpmaddwd %ymm15, %ymm6, %ymm6
vpaddd %ymm6, %ymm7, %ymm7
