// Score image pairs with an LPIPS package written by `lpips-fast export aoti` (libtorch only:
// no Python, no lpips_fast).
//
//   lpips_aoti MODEL.pt2 IN0.bin IN1.bin N H W
//
// IN0.bin / IN1.bin hold N*3*H*W little-endian float32 values each: (N,3,H,W) images in
// [-1, 1], row-major. Prints one distance per line. The package has a dynamic batch; H and W
// must be the size it was exported for unless it was exported with --dynamic-hw.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

static torch::Tensor read_images(const std::string& path, int64_t n, int64_t h, int64_t w) {
  const int64_t count = n * 3 * h * w;
  std::vector<float> data(static_cast<size_t>(count));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (f.gcount() != static_cast<std::streamsize>(count * sizeof(float)))
    throw std::runtime_error(path + ": expected " + std::to_string(count) + " float32 values");
  return torch::from_blob(data.data(), {n, 3, h, w}, torch::kFloat32).clone();
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 IN0.bin IN1.bin N H W\n";
    return 2;
  }
  try {
    const int64_t n = std::stoll(argv[4]), h = std::stoll(argv[5]), w = std::stoll(argv[6]);
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<torch::Tensor> inputs = {read_images(argv[2], n, h, w), read_images(argv[3], n, h, w)};
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> out = loader.run(inputs);
    torch::Tensor d = out.at(0).reshape({-1}).contiguous();
    std::cout << std::setprecision(9);
    for (int64_t i = 0; i < d.size(0); ++i) std::cout << d[i].item<float>() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "lpips_aoti: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
