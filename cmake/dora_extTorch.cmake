# Finds LibTorch for dora_ext and for the programs that use it (included by
# CMakeLists.txt and by the installed dora_extConfig.cmake).
#
# find_package(Torch) on the pip CUDA wheel fails on a machine without a GPU
# toolchain set up for it: FindCUDA follows a stray `nvcc` on PATH to a folder
# with no headers, and the wheel's libnvrtc lives beside torch, not in the
# toolkit. dora_ext_prepare_torch() fills in those hints (only where the caller
# left them unset) before find_package(Torch):
#
#   Torch_DIR             from DORA_EXT_TORCH_DIR_HINT (recorded at build time),
#                         CMAKE_PREFIX_PATH, or `python3 -c "import torch.utils; ..."`
#   CUDA_TOOLKIT_ROOT_DIR the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and
#                         the real folder of `nvcc` that holds include/cuda.h and bin/nvcc
#   CMAKE_CUDA_COMPILER   that toolkit's bin/nvcc (torch enables the CUDA language)
#   CUDA_nvrtc_LIBRARY    the wheel's site-packages/nvidia/*/lib/libnvrtc.so*, else the toolkit's
#
# With no toolkit (or for a CPU-only dora_ext, DORA_EXT_WITH_CUDA=OFF, unless the
# caller set CUDA_TOOLKIT_ROOT_DIR), a CUDA wheel is still usable: torch's CUDA
# targets are then defined from the wheel's own nvidia/* headers and libcudart
# (torch's cuda.cmake stops early when torch::cudart already exists).
#
# Results: DORA_EXT_TORCH_LIB_DIRS (the folders a program needs on its runtime
# path: torch/lib and the nvidia/*/lib holding libnvrtc), DORA_EXT_TORCH_FROM_WHEEL_ONLY.

function(_dora_ext_find_torch_dir out_var)
  if(DEFINED Torch_DIR AND EXISTS "${Torch_DIR}/TorchConfig.cmake")
    set(${out_var} "${Torch_DIR}" PARENT_SCOPE)
    return()
  endif()
  # find_package's own layouts for a prefix: <prefix>/Torch and <prefix>/share/cmake/Torch.
  set(_prefixes ${CMAKE_PREFIX_PATH})
  if(DEFINED ENV{CMAKE_PREFIX_PATH})
    string(REPLACE ":" ";" _env_prefixes "$ENV{CMAKE_PREFIX_PATH}")
    list(APPEND _prefixes ${_env_prefixes})
  endif()
  foreach(_prefix IN LISTS _prefixes)
    foreach(_suffix Torch share/cmake/Torch lib/cmake/Torch)
      if(_prefix AND EXISTS "${_prefix}/${_suffix}/TorchConfig.cmake")
        set(${out_var} "${_prefix}/${_suffix}" PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
  if(DORA_EXT_TORCH_DIR_HINT AND EXISTS "${DORA_EXT_TORCH_DIR_HINT}/TorchConfig.cmake")
    set(${out_var} "${DORA_EXT_TORCH_DIR_HINT}" PARENT_SCOPE)
    return()
  endif()
  # Last resort: the torch of the Python on PATH (the pip wheel ships LibTorch).
  if(Python3_EXECUTABLE)
    set(_dora_ext_python "${Python3_EXECUTABLE}")
  else()
    find_program(_dora_ext_python_exe NAMES python3 python)
    set(_dora_ext_python "${_dora_ext_python_exe}")
    unset(_dora_ext_python_exe CACHE)
  endif()
  if(_dora_ext_python)
    execute_process(
      COMMAND "${_dora_ext_python}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _prefix OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND EXISTS "${_prefix}/Torch/TorchConfig.cmake")
      set(${out_var} "${_prefix}/Torch" PARENT_SCOPE)
      return()
    endif()
  endif()
  set(${out_var} "" PARENT_SCOPE)
endfunction()

function(_dora_ext_find_cuda_toolkit out_var)
  set(_candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
  find_program(_dora_ext_nvcc_exe nvcc)
  set(_dora_ext_nvcc "${_dora_ext_nvcc_exe}")
  unset(_dora_ext_nvcc_exe CACHE)
  if(_dora_ext_nvcc)
    get_filename_component(_nvcc_real "${_dora_ext_nvcc}" REALPATH)
    get_filename_component(_nvcc_root "${_nvcc_real}" DIRECTORY)
    get_filename_component(_nvcc_root "${_nvcc_root}" DIRECTORY)
    list(APPEND _candidates "${_nvcc_root}")
  endif()
  foreach(_dir IN LISTS _candidates)
    if(_dir AND EXISTS "${_dir}/include/cuda.h" AND EXISTS "${_dir}/bin/nvcc")
      set(${out_var} "${_dir}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  set(${out_var} "" PARENT_SCOPE)
endfunction()

macro(dora_ext_prepare_torch)
  _dora_ext_find_torch_dir(_dora_ext_torch_dir)
  if(_dora_ext_torch_dir)
    set(Torch_DIR "${_dora_ext_torch_dir}" CACHE PATH "Folder of TorchConfig.cmake")
  endif()
  set(DORA_EXT_TORCH_LIB_DIRS "")
  set(DORA_EXT_TORCH_FROM_WHEEL_ONLY OFF)
  if(_dora_ext_torch_dir)
    get_filename_component(_dora_ext_torch_root "${_dora_ext_torch_dir}/../../.." REALPATH)
    list(APPEND DORA_EXT_TORCH_LIB_DIRS "${_dora_ext_torch_root}/lib")
    # CUDA builds of torch: libtorch_cuda.so beside libtorch.so.
    if(EXISTS "${_dora_ext_torch_root}/lib/libtorch_cuda.so")
      # The pip wheel's CUDA runtime: site-packages/nvidia/{cu13,cuda_nvrtc,cuda_runtime,...}/lib.
      get_filename_component(_dora_ext_site "${_dora_ext_torch_root}" DIRECTORY)
      file(GLOB _dora_ext_nvrtc_candidates
           "${_dora_ext_site}/nvidia/*/lib/libnvrtc.so.[0-9]*"
           "${_dora_ext_site}/nvidia/*/lib/libnvrtc.so")
      list(FILTER _dora_ext_nvrtc_candidates EXCLUDE REGEX "builtins|alt")
      # A CPU-only dora_ext needs no toolkit (the wheel's runtime is enough, and
      # skipping CUDA language setup saves ~10 s of configure); else use one if present.
      set(_dora_ext_cuda_root "")
      if(NOT DEFINED DORA_EXT_WITH_CUDA OR DORA_EXT_WITH_CUDA)
        _dora_ext_find_cuda_toolkit(_dora_ext_cuda_root)
      endif()
      if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND _dora_ext_cuda_root)
        set(CUDA_TOOLKIT_ROOT_DIR "${_dora_ext_cuda_root}" CACHE PATH "CUDA toolkit for find_package(Torch)")
        if(NOT DEFINED CMAKE_CUDA_COMPILER)  # torch enables CUDA: use that toolkit's nvcc, not a stray one on PATH
          set(CMAKE_CUDA_COMPILER "${_dora_ext_cuda_root}/bin/nvcc" CACHE FILEPATH "nvcc of CUDA_TOOLKIT_ROOT_DIR")
        endif()
      endif()
      if(NOT DEFINED CUDA_nvrtc_LIBRARY)
        if(_dora_ext_nvrtc_candidates)
          list(GET _dora_ext_nvrtc_candidates 0 _dora_ext_nvrtc)
          set(CUDA_nvrtc_LIBRARY "${_dora_ext_nvrtc}" CACHE FILEPATH "libnvrtc for find_package(Torch)")
        elseif(_dora_ext_cuda_root)
          find_library(CUDA_nvrtc_LIBRARY nvrtc PATHS "${_dora_ext_cuda_root}" PATH_SUFFIXES lib64 lib NO_DEFAULT_PATH)
        endif()
      endif()
      if(CUDA_nvrtc_LIBRARY)
        get_filename_component(_dora_ext_nvrtc_dir "${CUDA_nvrtc_LIBRARY}" DIRECTORY)
        get_filename_component(_dora_ext_nvrtc_dir "${_dora_ext_nvrtc_dir}" REALPATH)
        list(APPEND DORA_EXT_TORCH_LIB_DIRS "${_dora_ext_nvrtc_dir}")
      endif()
      if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND NOT TARGET torch::cudart)
        # No toolkit: stand in for torch's CUDA discovery with the wheel's own runtime.
        file(GLOB _dora_ext_cudart "${_dora_ext_site}/nvidia/*/lib/libcudart.so.[0-9]*")
        if(_dora_ext_cudart)
          list(GET _dora_ext_cudart 0 _dora_ext_cudart)
          get_filename_component(_dora_ext_cudart "${_dora_ext_cudart}" ABSOLUTE)
          get_filename_component(_dora_ext_wheel_cuda "${_dora_ext_cudart}" DIRECTORY)
          get_filename_component(_dora_ext_wheel_cuda "${_dora_ext_wheel_cuda}" DIRECTORY)
          add_library(torch::cudart INTERFACE IMPORTED)
          set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES "${_dora_ext_cudart}")
          if(EXISTS "${_dora_ext_wheel_cuda}/include/cuda_runtime_api.h")
            set_property(TARGET torch::cudart PROPERTY INTERFACE_INCLUDE_DIRECTORIES "${_dora_ext_wheel_cuda}/include")
          endif()
          set(DORA_EXT_TORCH_FROM_WHEEL_ONLY ON)
          message(STATUS "dora_ext: torch CUDA targets from the wheel in ${_dora_ext_wheel_cuda} (no CUDA toolkit used)")
        endif()
      endif()
    endif()
  endif()
  list(REMOVE_DUPLICATES DORA_EXT_TORCH_LIB_DIRS)
endmacro()
