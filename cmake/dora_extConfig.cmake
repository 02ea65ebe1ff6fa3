# find_package(dora_ext) for LibTorch consumers: brings in Torch, then the target dora_ext::dora_ext.
include(CMakeFindDependencyMacro)
find_dependency(Torch)
include("${CMAKE_CURRENT_LIST_DIR}/dora_extTargets.cmake")
