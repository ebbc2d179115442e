vpmaddwd %ymm8, %ymm12, %ymm0
vpaddd %ymm0, %ymm1, %ymm1
vpmaddwd %ymm9, %ymm12, %ymm2
vpaddd %ymm2, %ymm3, %ymm3
vpmaddwd %ymm8, %ymm13, %ymm4
vpaddd %ymm4, %ymm5, %ymm5
vpmaddwd %ymm9, %ymm13, %ymm6
vpaddd %ymm6, %ymm7, %ymm7
