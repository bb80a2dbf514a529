"""Helper for expression_ferplus.py: runs the `fer` package's mini-Xception (FER 22.5.1) on 48x48 faces.

Runs in an interpreter that has `fer` and TensorFlow (kept out of cem's own environment). Each face is
given to the model as that package prepares a detected face: grayscale, resized to the model's 64x64
input, scaled to [-1, 1]. No face detection (the crops are already faces). Output: (N, 8) probabilities
over the FER+ labels; the model's 7 classes are mapped by name and contempt, which it lacks, is 0.
Usage: python _fer_baseline.py PIXELS.npy OUT.npy
"""

import sys

import cv2
import numpy as np
from fer import FER

FERPLUS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
FER_TO_FERPLUS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness", "sad": "sadness",
                  "surprise": "surprise", "neutral": "neutral"}

pixels = np.load(sys.argv[1])
detector = FER()
labels = detector._get_labels()
faces = np.stack([cv2.resize(p, (64, 64)) for p in pixels]).astype(np.float32) / 255.0
faces = ((faces - 0.5) * 2.0)[..., None]
probs = np.concatenate([np.asarray(detector._classify_emotions(faces[i : i + 256]))
                        for i in range(0, len(faces), 256)])
out = np.zeros((len(pixels), 8))
for j, name in labels.items():
    out[:, FERPLUS.index(FER_TO_FERPLUS[name])] = probs[:, j]
np.save(sys.argv[2], out)
