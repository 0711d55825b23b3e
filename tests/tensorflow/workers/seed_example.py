# The origin document's example (section 5.2, "使用Ranger算法优化卷积神经网络(CNN)的Python代码示例"),
# verbatim except for two things: the import line (`from ranger import Ranger` ->
# `from ranger_hvd.tensorflow import Ranger`) and the block marked "offline data", which supplies the
# X_train / y_train / X_test / y_test that the document leaves undefined (sklearn's bundled digits,
# upscaled to 28x28x1; each Horovod rank takes its own share of the training set).
import tensorflow as tf
from ranger_hvd.tensorflow import Ranger

# 定义CNN模型
model = tf.keras.Sequential([
    tf.keras.layers.Conv2D(32, (3,3), activation='relu', input_shape=(28,28,1)),
    tf.keras.layers.MaxPooling2D((2,2)),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(10, activation='softmax')
])

# 定义优化器
optimizer = Ranger(lr=0.001, momentum=0.9)

# 定义损失函数
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# 定义训练函数
def train_epoch(model, optimizer, X_train, y_train):
    with tf.GradientTape() as tape:
        logits = model(X_train)
        loss = loss_fn(y_train, logits)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

# 定义测试函数
def test_epoch(model, X_test, y_test):
    with tf.GradientTape() as tape:
        logits = model(X_test)
        loss = loss_fn(y_test, logits)
    return loss

# ---- offline data (replaces the document's undefined data) ----------------------------------------
import os
import numpy as np
from sklearn.datasets import load_digits
_digits = load_digits()
_images = np.kron(_digits.images / 16.0, np.ones((3, 3)))           # 8x8 -> 24x24
_images = np.pad(_images, ((0, 0), (2, 2), (2, 2)))[..., None].astype("float32")  # -> 28x28x1
_labels = _digits.target.astype("int64")
_rank = int(os.environ.get("HOROVOD_RANK", "0"))
_size = int(os.environ.get("HOROVOD_SIZE", "1"))
X_train, y_train = _images[:1500][_rank::_size], _labels[:1500][_rank::_size]
X_test, y_test = _images[1500:], _labels[1500:]
# ----------------------------------------------------------------------------------------------------

# 训练模型
epochs = 10
batch_size = 32

for epoch in range(epochs):
    for i in range(0, len(X_train), batch_size):
        train_epoch(model, optimizer, X_train[i:i+batch_size], y_train[i:i+batch_size])
    loss = test_epoch(model, X_test, y_test)
    print(f"Epoch {epoch+1}, loss: {loss.numpy():.4f}")
